#!/usr/bin/env python
"""Ray job entrypoint: ``batchdet detect`` on the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/detect_job.py --config jobs/examples/coco-val2017-s3.yaml [detect flags]

Takes exactly the arguments of ``batchdet detect`` (``--config FILE`` for a
job spec, flags override it). Ray sets RAY_ADDRESS for a job's driver, so
detect joins this cluster; the exit status (0 = run completed) becomes the
job's SUCCEEDED/FAILED. With ``--working-dir .`` Ray puts the repository on
every worker's PYTHONPATH, so the batchdet uploaded with the job is the one
that runs; the first log line says which copy was imported.
"""

import sys
from pathlib import Path

try:
    import batchdet  # noqa: F401  (the runtime env's copy, or the image's)
except ImportError:  # run from a clone without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchdet.cluster.job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
