"""Maintenance script (run by hand, not in CI): golden fixtures from the official method code.

    python tests/golden/make_golden.py --repos /tmp/official            # reduced model: fixtures
    python tests/golden/make_golden.py --repos /tmp/official --full     # ViT-B/16 check, no fixtures

`--repos` holds unmodified git clones of the official repositories, named as on GitHub:
CoOp/, multimodal-prompt-learning/, Multi-Modal-Adapter/, COMMA/ and Dassl.pytorch/ (its config
defaults); `--deps` a folder with `yacs` (`pip install --target DIR yacs==0.1.8`), which Dassl's
config needs. Each official case runs in its own subprocess (the repositories all ship a
top-level `clip` and `trainers` package) and the script refuses a clone with local changes.

What runs on the official side, per case (see cases.py for the shared world and the mapping):
the trainer's own `build_model` (its `load_clip_to_cpu`, OpenAI's `build_model`, `CustomCLIP`, its
freezing rule) on the config built as the repository's `train.py` does (Dassl defaults, the repo's
`extend_cfg`, the shipped trainer YAML, then our overrides: backbone, image size, dataset name,
`PREC fp32` and, for the reduced model, prompt depths), the trainer's own `forward_backward` on
one batch, and its `model_inference` in eval mode. Runtime stand-ins, all in the worker process:
* `dassl.engine/optim/metrics/utils`: the trainers import them at module level; a registry whose
  `register()` returns the class, a `TrainerX` with the handful of base methods the trainers
  call (backward without an optimiser step), an optimiser whose zero_grad/step do nothing;
* `clip._download` returns the shared weights file;
* `Tensor.half`, `Module.half`, `.cuda()` are identities: the official forwards hard-code fp16
  casts and CUDA moves (COMMA builds its teacher in fp16 and moves it to CUDA even with PREC
  fp32); the comparison is fp32 on the CPU;
* COMMA paper mode only: the prompt learner's forward without its `.data` writes (the generated
  deep vision prompts kept in a list, so gradients reach the generators); written here, the
  released code is the `comma_released` case.

Then ours runs on the same weights and values (cases.run_ours), the deltas are printed, and the
official numbers are written to fixtures/<case>.safetensors with JSON metadata.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> `golden` package
from golden import cases as C  # noqa: E402

REPO_DIRS = {C.COOP_REPO: "CoOp", C.MAPLE_REPO: "multimodal-prompt-learning", C.MMA_REPO: "Multi-Modal-Adapter",
             C.COMMA_REPO: "COMMA"}
DASSL_DIR = "Dassl.pytorch"
FULL_REPORT = C.HERE / "full_size_check.json"


# ---- repositories ---------------------------------------------------------------------------
def repo_commit(path: Path) -> str:
    """HEAD of an unmodified clone; refuses local changes to tracked files."""
    if subprocess.run(["git", "-C", str(path), "diff", "--quiet", "HEAD"]).returncode != 0:
        raise SystemExit(f"{path} has local changes: the golden numbers must come from unmodified official code")
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


# ---- worker: the official side --------------------------------------------------------------
class _NoStepOptimizer:
    """Gradients are what we record: nothing is zeroed (they start empty) and nothing steps."""

    def zero_grad(self, *a, **k):
        pass

    def step(self, *a, **k):
        pass


class _TrainerX:
    """Stand-in for dassl.engine.TrainerX: only what build_model/forward_backward/inference call."""

    device = torch.device("cpu")
    batch_idx, num_batches = 0, 2  # not the epoch's last batch: no LR update
    scaler = None

    def register_model(self, name="model", model=None, optim=None, sched=None):
        pass

    def model_backward_and_update(self, loss, names=None):
        loss.backward()

    def model_inference(self, input):
        return self.model(input)

    def update_lr(self, names=None):
        pass


def _install_stand_ins(repo: Path, weights: Path) -> None:
    class _Registry:
        def register(self, *a, **k):
            return lambda cls: cls

    def _unused(*a, **k):
        raise RuntimeError("not used by the golden run")

    stand_ins = {
        "dassl.engine": {"TRAINER_REGISTRY": _Registry(), "TrainerX": _TrainerX},
        "dassl.metrics": {"compute_accuracy": lambda output, target, topk=(1,): [torch.zeros(())]},
        "dassl.utils": {"load_pretrained_weights": _unused, "load_checkpoint": _unused},
        "dassl.optim": {"build_optimizer": lambda *a, **k: _NoStepOptimizer(), "build_lr_scheduler": lambda *a, **k: None},
    }
    for name, attrs in stand_ins.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    torch.Tensor.half = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    import clip.clip as official_clip  # the repository's own package (first on sys.path)

    if not Path(official_clip.__file__).resolve().is_relative_to(repo.resolve()):  # not clip-anytorch
        raise RuntimeError(f"imported {official_clip.__file__}, not the clip package of {repo}")

    official_clip._download = lambda url, *a, **k: str(weights)
    build = official_clip.build_model

    def build_and_check(state_dict, *args, **kwargs):
        expected = {k: v.clone() for k, v in state_dict.items()}
        model = build(state_dict, *args, **kwargs)
        loaded = model.state_dict()
        bad = [k for k, v in expected.items() if k not in loaded or not torch.equal(loaded[k].float(), v.float())]
        if bad:
            raise RuntimeError(f"official build_model did not load {len(bad)} shared tensors, e.g. {bad[:3]}")
        return model

    official_clip.build_model = build_and_check


def _extend_cfg(repo: Path):
    """The repository's own `extend_cfg` from its train.py (train.py itself imports datasets)."""
    tree = ast.parse((repo / "train.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extend_cfg")
    namespace: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), str(repo / "train.py"), "exec"), namespace)
    return namespace["extend_cfg"]


def _paper_mode_forward(self):
    """COMMA's prompt learner without `.data` writes: generated prompts stay in the graph."""
    ctx = self.ctx
    prompts = self.construct_prompts(ctx.unsqueeze(0).expand(self.n_cls, -1, -1), self.token_prefix, self.token_suffix)
    shared_ctx = self.proj(ctx)
    vision = [self.compound_prompt_projections_image_base(shared_ctx, ctx)]
    for i, generator in enumerate(self.compound_prompt_projections_image):
        vision.append(generator(vision[i], self.compound_prompts_text[i]))
    return prompts, shared_ctx, self.compound_prompts_text, vision


def worker(case: C.Case, arch: str, repos: Path, deps: Optional[Path], weights: Path, out: Path) -> None:
    import importlib

    from safetensors.torch import save_file

    repo = repos / REPO_DIRS[case.repo]
    sys.path[:0] = [str(repo), str(repos / DASSL_DIR)] + ([str(deps)] if deps else [])
    _install_stand_ins(repo, weights)
    from dassl.config import get_cfg_default  # the real Dassl defaults

    variant = case.variant(arch)
    size = C.IMAGE_SIZE[arch]
    cfg = get_cfg_default()
    _extend_cfg(repo)(cfg)
    cfg.merge_from_file(str(repo / case.yaml))
    opts = ["MODEL.BACKBONE.NAME", "ViT-B/16", "INPUT.SIZE", (size, size), "DATASET.NAME", C.DATASET,
            case.prec_key, "fp32"]
    for key, value in variant.overrides:
        opts += [key, value]
    cfg.merge_from_list(opts)
    cfg.freeze()

    module_name, cls_name = case.trainer.split(":")
    module = importlib.import_module(module_name)
    if case.paper_mode:
        module.MultiModalPromptLearner.forward = _paper_mode_forward
    trainer = object.__new__(getattr(module, cls_name))
    trainer.cfg = cfg
    trainer.dm = types.SimpleNamespace(dataset=types.SimpleNamespace(classnames=list(C.CLASSNAMES)))
    trainer.build_model()
    model = trainer.model

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = {}
    if case.phrase_init:
        tensors["init.prompt_learner.ctx"] = trainable["prompt_learner.ctx"].detach().clone()
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(C.learnable_value(name, p.shape))

    model.train()
    summary = trainer.forward_backward({"img": C.images(arch), "label": C.labels()})
    model.eval()
    with torch.no_grad():
        tensors["logits"] = trainer.model_inference(C.images(arch)).float()
        if case.method == "comma":
            tensors["kd"] = torch.tensor(float(model(C.images(arch))[1]))
    tensors["loss"] = torch.tensor(float(summary["loss"]))
    no_grad = []
    for name, p in trainable.items():
        if p.grad is None:
            no_grad.append(name)
        else:
            tensors[f"grad.{name}"] = p.grad.detach().float().clone()
    meta = {"trainable": {n: list(p.shape) for n, p in trainable.items()}, "no_grad": no_grad,
            "config": json.loads(json.dumps(cfg.TRAINER[case.prec_key.split(".")[1]], default=str))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"meta": json.dumps(meta)})


# ---- driver ---------------------------------------------------------------------------------
def run_official(case: C.Case, arch: str, repos: Path, deps: Optional[Path], weights: Path, tmp: Path):
    from safetensors import safe_open

    out = tmp / f"{case.name}.safetensors"
    cmd = [sys.executable, __file__, "--worker", case.name, "--arch", arch, "--repos", str(repos),
           "--weights", str(weights), "--out", str(out)] + (["--deps", str(deps)] if deps else [])
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"official run of {case.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    grads = {n: t.get(f"grad.{n}") for n in meta["trainable"]}
    result = C.StepResult(logits=t["logits"], loss=float(t["loss"]), grads=grads,
                          kd=float(t["kd"]) if "kd" in t else None,
                          init={k[5:]: v for k, v in t.items() if k.startswith("init.")})
    return result, meta


def write_fixture(case: C.Case, official: C.StepResult, meta: dict, deltas: C.Deltas, commit: str,
                  weights_sha: str, values_sha: str) -> Path:
    from safetensors.torch import save_file

    variant = case.reduced
    tensors = {"logits": official.logits, "loss": torch.tensor(official.loss)}
    if official.kd is not None:
        tensors["kd"] = torch.tensor(official.kd)
    for name, v in official.init.items():
        tensors[f"init.{name}"] = v
    for name, g in official.grads.items():
        if g is not None:
            tensors[f"grad.{name}"] = C.sketch(name, g)
    info = {
        "case": case.name, "method": case.method, "notes": case.notes,
        "official": {"repo": case.repo, "commit": commit, "trainer": case.trainer, "yaml": case.yaml,
                     "overrides": [list(o) for o in variant.overrides], "cfg": meta["config"],
                     "paper_mode_shim": case.paper_mode},
        "ours": {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in variant.config.items()}},
        "arch": C.REDUCED_ARCH, "weights_sha256": weights_sha, "values_sha256": values_sha,
        "trainable": meta["trainable"], "no_grad": meta["no_grad"],
        "mapping": {n: case.link(variant, n).to_json() for n in meta["trainable"]},
        "sketch": {"above": C.SKETCH_ABOVE, "buckets": C.SKETCH_BUCKETS,
                   "sketched": [n for n, s in meta["trainable"].items() if torch.Size(s).numel() > C.SKETCH_ABOVE]},
        "measured_exact": deltas.to_json(),
        "versions": {"torch": torch.__version__, "open_clip": _open_clip_version()},
    }
    path = C.FIXTURE_DIR / f"{case.name}.safetensors"
    C.FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"golden": json.dumps(info, sort_keys=True)})
    return path


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repos", type=Path, required=True, help="folder with unmodified clones of the official repos")
    p.add_argument("--deps", type=Path, default=None, help="folder with yacs (pip install --target)")
    p.add_argument("--cases", default="all", help="comma-separated case names (default: all)")
    p.add_argument("--full", action="store_true", help="full-size ViT-B/16 check; writes full_size_check.json, no fixtures")
    p.add_argument("--no-write", action="store_true", help="compare only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(C.CASES_BY_NAME[args.worker], args.arch, args.repos, args.deps, args.weights, args.out)
        return 0

    torch.manual_seed(0)
    names = [c.name for c in C.CASES] if args.cases == "all" else args.cases.split(",")
    arch = C.FULL_ARCH if args.full else C.REDUCED_ARCH
    commits = {r: repo_commit(args.repos / d) for r, d in REPO_DIRS.items()}
    commits[DASSL_DIR] = repo_commit(args.repos / DASSL_DIR)
    backbone = C.our_backbone(arch)
    state = backbone.model.state_dict()
    weights_sha = C.tensors_sha256(state)
    rows = []
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        weights = Path(tmp) / "clip.pt"
        torch.save(state, weights)
        for name in names:
            case = C.CASES_BY_NAME[name]
            official, meta = run_official(case, arch, args.repos, args.deps, weights, Path(tmp))
            ours = C.run_ours(case, arch, backbone, meta["trainable"])
            deltas = C.compare(ours, official)
            init_ok = all(torch.equal(ours.init[k], v) for k, v in official.init.items())
            problems = deltas.failures() + ([] if init_ok else ["initial ctx differs"])
            if case.known_difference:
                status = f"differs as documented ({case.known_difference})" if problems else "UNEXPECTEDLY EQUAL"
            else:
                status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            rows.append({"case": name, "repo": case.repo, "commit": commits[case.repo][:7], **deltas.to_json(),
                         "official_trainable": sum(torch.Size(s).numel() for s in meta["trainable"].values()),
                         "init_ctx_equal": init_ok if official.init else None, "status": status,
                         "no_grad": meta["no_grad"]})
            print(f"{name:16s} logits {deltas.max_logit:.2e}  grad {deltas.max_grad:.2e}  loss {deltas.loss:.2e}"
                  + (f"  kd {deltas.kd:.2e}" if deltas.kd is not None else "") + f"  {status}", flush=True)
            if not args.full and not args.no_write and not case.known_difference:
                values_sha = C.tensors_sha256({n: C.learnable_value(n, s) for n, s in meta["trainable"].items()})
                write_fixture(case, official, meta, deltas, commits[case.repo], weights_sha, values_sha)
    if args.full and args.cases == "all" and not args.no_write:
        report = {"arch": arch, "image_size": C.IMAGE_SIZE[arch], "weights_sha256": weights_sha,
                  "commits": commits, "versions": {"torch": torch.__version__, "open_clip": _open_clip_version()},
                  "cases": rows}
        FULL_REPORT.write_text(json.dumps(report, indent=1) + "\n")
    print("\n| case | official | trainable | max abs delta logit | max grad rel. error | abs delta loss | abs delta KD |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        kd = f"{r['abs_kd']:.1e}" if r["abs_kd"] is not None else "-"
        print(f"| {r['case']} | {r['repo']}@{r['commit']} | {r['official_trainable']:,} | {r['max_abs_logit']:.1e} "
              f"| {r['max_grad_rel']:.1e} | {r['abs_loss']:.1e} | {kd} |")
    return 1 if any(r["status"] == "UNEXPECTEDLY EQUAL" or r["status"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
