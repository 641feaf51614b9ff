"""Command line: ``ippo train CONFIG.yaml [key=value ...]``, ``ippo eval CONFIG.yaml [key=value ...]``,
``ippo verify RUN_DIR``.

Overrides use dotted keys (``influence.mode=target``, ``ppo.lr=1e-5``, ``resume=true``). Works
under ``torchrun --nproc_per_node N -m ippo.cli train ...`` for several processes.
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE = """usage: ippo train CONFIG.yaml [key=value ...]
       ippo eval  CONFIG.yaml [key=value ...] [--checkpoint DIR]
       ippo verify RUN_DIR       check every checkpoint of a run (exit 1 unless the latest verifies)
       ippo demo  [...]"""


def _parse(argv: list[str]) -> tuple[str, str, list[str], str | None]:
    p = argparse.ArgumentParser(prog="ippo", usage=USAGE)
    p.add_argument("command", choices=["train", "eval"])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value (dotted keys)")
    p.add_argument("--checkpoint", default=None, help="eval: checkpoint directory (default: the run's latest)")
    a = p.parse_args(argv)
    return a.command, a.config, a.overrides, a.checkpoint


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ippo verify", description="Check every checkpoint of a run against its "
                                "manifest. Exit code 0 when the latest verifies, 1 otherwise.")
    p.add_argument("run_dir", help="the run's run_dir (holds checkpoints/)")
    a = p.parse_args(argv)
    from ippo.rl.checkpoint import verify_run

    lines, rc = verify_run(a.run_dir)
    print("\n".join(lines))
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "demo":  # added by another module; imported lazily so train/eval never depend on it
        try:
            from ippo.demo import main as demo_main
        except ImportError:
            print("ippo demo is not available in this installation", file=sys.stderr)
            return 2
        return int(demo_main(argv[1:]) or 0)

    if argv[0] == "verify":
        return _verify(argv[1:])

    from ippo.rl.checkpoint import CheckpointError
    from ippo.rl.config import ConfigError, load_config
    from ippo.rl.data import DataError

    command, config, overrides, checkpoint = _parse(argv)
    try:
        cfg = load_config(config, overrides)
        if command == "train":
            from ippo.rl.loop import train

            summary = train(cfg)
            print(json.dumps(summary))
            return 0
        from ippo.rl.evaluate import run_eval

        print(json.dumps(run_eval(cfg, checkpoint)))
        return 0
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"ippo: error: {e}", file=sys.stderr)
        return 2
    finally:
        from ippo.rl.parallel import distributed

        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
