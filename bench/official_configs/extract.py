"""Read the official configs our recipes mirror and write them in our vocabulary (run by hand).

    python bench/official_configs/extract.py [--mirror /work/.mirror] [--check]

For every config listed in `training/recipes/official/mirrors.json` ("configs"), from the fetched
repositories (the `fetch` tool's bare git mirrors, `<owner>+<name>/repo`, read at HEAD):

1. Dassl's defaults (`dassl/config/defaults.py`, the `_C.*` assignments),
2. the trainer's defaults from the repo's `train.py` (`extend_cfg`: `cfg.TRAINER.<T>.* = ...`),
3. the trainer YAML,
4. the run-script options listed with the config (`opts`: what the official scripts pass),

merged in that order (Dassl's own order), then translated into the fields of our recipes
(`TRAINER_FIELDS` below says how, e.g. CoOp's n_ctx = the words of CTX_INIT when it is set, MMA's
1-based ADAPTER_START..END -> 0-based blocks). Writes `training/recipes/official/configs.json`
with each repository's commit. Only facts (numbers, strings) are written; no official code is
copied. `--check` exits 1 if the committed file differs from what the mirrors give.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = REPO / "training" / "recipes" / "official"
REPOS = {
    "COOP": "KaiyangZhou/CoOp",
    "MAPLE": "muzairkhattak/multimodal-prompt-learning",
    "MMA": "ZjjConan/Multi-Modal-Adapter",
    "COMMA": "hulianyuyy/COMMA",
    "DASSL": "KaiyangZhou/Dassl.pytorch",
}
# cfg.TRAINER.<key> each trainer reads
TRAINER_KEY = {"CoOp": "COOP", "ZeroshotCLIP": "COOP", "CoCoOp": "COCOOP", "MaPLe": "MAPLE", "VPT": "VPT",
               "IVLP": "IVLP", "MultiModalAdapter": "MMADAPTER", "COMMA": "COMMA"}


class Mirror:
    def __init__(self, root: Path, name: str):
        self.git = root / name.replace("/", "+") / "repo"
        if not self.git.is_dir():
            raise SystemExit(f"{self.git}: not fetched (use the fetch tool on github:{name})")
        self.name = name

    def commit(self) -> str:
        return subprocess.run(["git", "--git-dir", str(self.git), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()

    def read(self, path: str) -> str:
        return subprocess.run(["git", "--git-dir", str(self.git), "show", f"HEAD:{path}"], check=True,
                              capture_output=True, text=True).stdout


def _assignments(text: str, prefix: str) -> dict[str, Any]:
    """`prefix.A.B = literal  # comment` lines -> {"A.B": value} (non-literals are skipped)."""
    out = {}
    for m in re.finditer(rf"^\s*{re.escape(prefix)}\.([A-Za-z0-9_.]+)\s*=\s*(.+?)\s*(#.*)?$", text, re.M):
        try:
            out[m.group(1)] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            pass
    return out


def _yacs_value(v: Any) -> Any:
    """yacs decodes YAML strings with literal_eval ("1e-5" -> 1e-05, "(224, 224)" -> a tuple)."""
    if isinstance(v, str):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _yacs_value(v)
    return out


def _ctx(init: str, n_ctx: int) -> tuple[int, Any]:
    """CoOp/CoCoOp: a CTX_INIT phrase sets n_ctx to its word count (trainers/coop.py)."""
    init = (init or "").replace("_", " ")
    return (len(init.split(" ")), init) if init else (n_ctx, None)


def _coop(t: dict) -> dict:
    n, init = _ctx(t["CTX_INIT"], t["N_CTX"])
    return {"n_ctx": n, "ctx_init": init, "class_token_position": t["CLASS_TOKEN_POSITION"], "class_specific": t["CSC"]}


def _cocoop(t: dict) -> dict:
    n, init = _ctx(t["CTX_INIT"], t["N_CTX"])
    return {"n_ctx": n, "ctx_init": init}


TRAINER_FIELDS: dict[str, Callable[[dict], dict]] = {
    "CoOp": _coop,
    "CoCoOp": _cocoop,
    # trainers/zsclip.py: CUSTOM_TEMPLATES[dataset], i.e. each dataset's own template (ours: None)
    "ZeroshotCLIP": lambda t: {"templates": None},
    "MaPLe": lambda t: {"n_ctx": t["N_CTX"], "ctx_init": t["CTX_INIT"] or None, "depth": t["PROMPT_DEPTH"]},
    # trainers/vpt.py hard-codes the classifier prompt "a photo of a {class}."
    "VPT": lambda t: {"n_ctx": t["N_CTX_VISION"], "depth": t["PROMPT_DEPTH_VISION"], "text_template": "a photo of a {}."},
    "IVLP": lambda t: {"n_ctx_text": t["N_CTX_TEXT"], "n_ctx_vision": t["N_CTX_VISION"], "text_depth": t["PROMPT_DEPTH_TEXT"],
                       "vision_depth": t["PROMPT_DEPTH_VISION"], "ctx_init": t["CTX_INIT"] or None},
    # clip/gsl.py's gradient scaling is always on; ADAPTER_START..END are 1-based and inclusive
    "MultiModalAdapter": lambda t: {"rank": t["ADAPTER_DIM"], "alpha": t["ADAPTER_SCALE"], "grad_scale": True,
                                    "blocks": list(range(t["ADAPTER_START"] - 1, t["ADAPTER_END"])),
                                    "text_template": f"{t['TEXT_CTX_INIT']} {{}}."},
    # the released trainers/comma.py writes the generated prompts through `.data`
    "COMMA": lambda t: {"n_ctx": t["N_CTX"], "ctx_init": t["CTX_INIT"] or None, "depth": t["PROMPT_DEPTH"],
                        "kd_weight": t["WEIGHT"], "kd_last_layers": t["LAST_LAYER"], "detach_generator": True},
}


def translate(cfg: dict, trainer: str) -> dict:
    t = {k.split(".", 2)[2]: v for k, v in cfg.items() if k.startswith(f"TRAINER.{TRAINER_KEY[trainer]}.")}
    values = {"backbone": cfg["MODEL.BACKBONE.NAME"].replace("/", "-"), "eval_batch_size": cfg["DATALOADER.TEST.BATCH_SIZE"]}
    if trainer != "ZeroshotCLIP":  # eval-only: no training fields apply
        warmup = max(int(cfg["OPTIM.WARMUP_EPOCH"]), 0)
        values.update({
            "train.epochs": cfg["OPTIM.MAX_EPOCH"], "train.batch_size": cfg["DATALOADER.TRAIN_X.BATCH_SIZE"],
            "train.lr": cfg["OPTIM.LR"], "train.optimizer": cfg["OPTIM.NAME"], "train.momentum": cfg["OPTIM.MOMENTUM"],
            "train.weight_decay": cfg["OPTIM.WEIGHT_DECAY"], "train.warmup_epochs": warmup,
            "train.lr_scheduler": cfg["OPTIM.LR_SCHEDULER"], "train.crop_scale": list(cfg["INPUT.RRCROP_SCALE"]),
            "train.precision": t["PREC"],
        })
        if warmup:  # Dassl: WARMUP_CONS_LR only acts with a constant warm-up
            if cfg["OPTIM.WARMUP_TYPE"] != "constant":
                values["train.warmup_type"] = cfg["OPTIM.WARMUP_TYPE"]
            values["train.warmup_lr"] = cfg["OPTIM.WARMUP_CONS_LR"]
    values.update({f"method.{k}": v for k, v in TRAINER_FIELDS[trainer](t).items()})
    return values


def extract(mirror_root: Path) -> dict:
    spec = json.loads((OFFICIAL / "mirrors.json").read_text())["configs"]
    mirrors = {k: Mirror(mirror_root, v) for k, v in REPOS.items()}
    dassl = _assignments(mirrors["DASSL"].read("dassl/config/defaults.py"), "_C")
    configs = {}
    for cid, c in spec.items():
        m = mirrors[c["repo"]]
        cfg = dict(dassl)
        cfg.update(_assignments(m.read("train.py"), "cfg"))
        cfg.update(_flatten(yaml.safe_load(m.read(c["file"]))))
        cfg.update(c.get("opts", {}))
        src = f"{m.name}@{m.commit()[:7]}:{c['file']}" + (f" + {c['opts_source']}" if c.get("opts_source") else "")
        configs[cid] = {"source": src, "values": translate(cfg, c["trainer"])}
    return {"about": "written by bench/official_configs/extract.py from the official repositories; do not edit",
            "repos": {k: f"{m.name}@{m.commit()}" for k, m in mirrors.items()}, "configs": configs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirror", default="/work/.mirror", help="folder of fetched repositories (<owner>+<name>/repo)")
    ap.add_argument("--check", action="store_true", help="compare with the committed configs.json instead of writing")
    args = ap.parse_args(argv)
    data = extract(Path(args.mirror))
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    path = OFFICIAL / "configs.json"
    if args.check:
        same = path.exists() and path.read_text() == text
        print("configs.json is up to date" if same else "configs.json differs from the official repositories")
        return 0 if same else 1
    path.write_text(text)
    print(f"wrote {path} ({len(data['configs'])} configs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
