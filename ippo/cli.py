"""Command line: ``ippo train CONFIG.yaml [key=value ...]``, ``ippo eval CONFIG.yaml [key=value ...]``,
``ippo verify RUN_DIR``, ``ippo inspect RUN_DIR [--iteration N] [--out FILE.html]``, ``ippo demo [...]``.

Overrides use dotted keys (``influence.mode=target``, ``ppo.lr=1e-5``, ``resume=true``). Works
under ``torchrun --nproc_per_node N -m ippo.cli train ...`` for several processes.

Every error a user can cause ends in one line, ``ippo: error: ...`` naming the file, key or row, and exit
code 2 (``ippo verify``: 1 when the latest checkpoint is damaged); Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {
    "train": "train a policy with PPO or I-PPO (Influence-Guided PPO)",
    "eval": "evaluate a run's newest verified checkpoint (or --checkpoint DIR, or --base) on data.test_path",
    "verify": "check every checkpoint of a run against its manifest (exit 1 unless the latest verifies)",
    "inspect": "why each episode was kept or dropped: an HTML report with per-token influence (offline, at theta_old)",
    "demo": "the bundled experiment: PPO vs I-PPO vs controls on a verifiable task (ippo demo --help)",
}
USAGE = "ippo {" + ",".join(COMMANDS) + "} ..."
HELP = f"""usage: {USAGE}

commands:
{chr(10).join(f"  {name:<8}{what}" for name, what in COMMANDS.items())}

`ippo COMMAND --help` describes each one."""

CONFIG_HELP = """CONFIG is a YAML file of settings (every key is optional; `{{}}` runs on the defaults). Each
key=value override after it sets one dotted key of that config, parsed as a YAML value, and wins over the file:

  ippo {cmd} configs/smoke_cpu.yaml ppo.lr=1e-5 influence.mode=target
  ippo {cmd} configs/smoke_cpu.yaml run_dir=runs/try2 seed=1 "data.prompt_template='Q: {{question}}\\nA:'"

Every key, its default and what it means: ippo/rl/settings.py (README.md, section "Training")."""


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"ippo {command}", description=COMMANDS[command],
                                epilog=CONFIG_HELP.format(cmd=command),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="YAML file of settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides of the config")
    if command == "train":
        p.epilog += ("\n\nresume=true continues the run in run_dir from its newest checkpoint that verifies; "
                     "overwrite=true starts\nit over (deleting its checkpoints and logs). One process at a time "
                     "may use a run_dir.")
    else:
        p.add_argument("--checkpoint", default=None, metavar="DIR",
                       help="checkpoint directory to evaluate (default: the run's newest that verifies)")
        p.add_argument("--base", action="store_true",
                       help="evaluate model.path itself, untrained (a run without checkpoints is an error otherwise)")
    return p


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ippo verify", description=COMMANDS["verify"] + ". Each checkpoint is listed "
                                "as ok, damaged (and why) or unverified, with what resume=true would load.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's run_dir (holds checkpoints/)")
    a = p.parse_args(argv)
    from ippo.rl.checkpoint import verify_run

    lines, rc = verify_run(a.run_dir)
    print("\n".join(lines))
    return rc


def _inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ippo inspect", description=COMMANDS["inspect"] + ". One self-contained HTML file: kept fraction, "
        "scores by reward (and category), weights, and the top proponents, opponents and dropped episodes with "
        "positive reward, each response token coloured by its contribution to the episode's score.",
        epilog="Iteration N is rebuilt at its theta_old: checkpoints/iter_N (written after N iterations; iteration 0: "
               "the starting model). checkpoint.keep_last prunes old checkpoints: train with checkpoint.keep_every=K "
               "to keep every K-th. The recomputed scores are checked against the logged ones (rtol 1e-4).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's run_dir (holds influence.jsonl, config.json)")
    p.add_argument("--iteration", type=int, action="append", default=None, metavar="N",
                   help="iteration to attribute per token (repeatable; default: the newest with its theta_old)")
    p.add_argument("--out", default=None, metavar="FILE.html", help="the report (default: RUN_DIR/inspect.html)")
    p.add_argument("--category", default=None, metavar="MODULE:FUNCTION",
                   help="(response, gold answer) -> an episode category, e.g. ippo.demo:episode_category")
    p.add_argument("--top", type=int, default=5, metavar="K", help="top proponents and opponents shown (default 5)")
    p.add_argument("--sample", type=int, default=5, metavar="M",
                   help="dropped episodes with positive reward shown (default 5)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a = p.parse_args(argv)
    from ippo.inspection import inspect_run

    res = inspect_run(a.run_dir, a.iteration, a.out, a.category, max(0, a.top), max(0, a.sample), a.device)
    print(json.dumps(res.summary()))
    return 0


def _demo(argv: list[str]) -> int:
    try:  # imported lazily so that train/eval never depend on it
        from ippo.demo import main as demo_main
    except ImportError:
        print("ippo: error: ippo demo is not available in this installation", file=sys.stderr)
        return 2
    return int(demo_main(argv) or 0)


def _train_or_eval(command: str, argv: list[str]) -> int:
    a = _parser(command).parse_args(argv)
    from ippo.rl.config import load_config

    cfg = load_config(a.config, a.overrides)
    if command == "train":
        from ippo.rl.loop import train

        print(json.dumps(train(cfg)))
        return 0
    from ippo.rl.evaluate import run_eval

    print(json.dumps(run_eval(cfg, a.checkpoint, base=a.base)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"usage: {USAGE}\nippo: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    from ippo.errors import ConfigError, NonFiniteError
    from ippo.rl.checkpoint import CheckpointError
    from ippo.rl.data import DataError

    try:
        if command == "demo":
            return _demo(rest)
        if command == "verify":
            return _verify(rest)
        if command == "inspect":
            return _inspect(rest)
        return _train_or_eval(command, rest)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        print(f"ippo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that fills up or turns read-only under a log file, ...: str(e) names the file
        print(f"ippo: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's own usage errors (exit code 2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        hint = "; resume with resume=true" if command == "train" else ""
        print(f"\nippo: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        from ippo.rl.parallel import distributed

        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
