"""Batch scoring (`clipheads score`): one job model, two engines, one crash-safe output.

    job.py         ScoreJob / ScoreSummary, source metadata, input reading (shared by both engines)
    columns.py     runtime outputs -> top-k columns
    listing.py     deterministic input listings (directory, CSV, Parquet) and their fixed shards
    shards.py      the crash-safe sharded Parquet output (resume, errors)
    local.py       the local engine: bounded decode pipeline -> one Runtime
    ray_engine.py  the Ray Data engine: the same scoring on a cluster
    run.py         score(job): validate, pick the engine, commit, summarise
    cli.py         flags -> ScoreJob -> score()

Imports run one way: cli -> run -> {local, ray_engine} -> {columns, job} -> shards -> listing.
"""
from .job import ScoreJob, ScoreSummary, UsageError
from .run import score

__all__ = ["ScoreJob", "ScoreSummary", "UsageError", "score"]
