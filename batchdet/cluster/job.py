"""What runs on the cluster as a Ray job's entrypoint.

``python -m batchdet.cluster.job [--config FILE] [detect flags]`` (and the
``jobs/detect_job.py`` wrapper) is ``batchdet detect`` plus a banner saying
which batchdet runs (version and where it was imported from, so a job log
shows whether the runtime environment's copy or the image's was used). Ray
sets ``RAY_ADDRESS`` for a job's driver, so ``detect`` joins the cluster it
was submitted to. The exit status is detect's: 0 when the run completed
(per-image errors included), 2 with one line on bad arguments — which Ray
reports as the job's SUCCEEDED or FAILED.
"""

from __future__ import annotations

import os
import platform
import sys

import batchdet


def banner() -> str:
    where = os.path.dirname(os.path.abspath(batchdet.__file__))
    return (f"batchdet {batchdet.__version__} from {where} on {platform.node()} "
            f"(python {platform.python_version()}, RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '-')})")


def main(argv: list[str] | None = None) -> int:
    from batchdet.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["detect"]:
        args = args[1:]
    print(banner(), flush=True)
    return cli_main(["detect", *args])


if __name__ == "__main__":
    sys.exit(main())
