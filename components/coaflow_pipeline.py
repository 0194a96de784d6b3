"""The Kubeflow pipeline of coaflow, compiled: ``coaflow.orchestrate.kfp.build_pipeline`` over the
Kubernetes settings both engines read (coaflow's ``k8s.yaml``, or ``$COAFLOW_K8S_CONFIG``).

    python -m components.coaflow_pipeline            # recompile components/coaflow_pipeline.yaml
    coaflow run --engine kfp                         # run it here with kfp.local (no cluster)
"""

import argparse
from pathlib import Path

from coaflow.orchestrate import k8s
from coaflow.orchestrate.kfp import compile_pipeline

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile the coaflow Kubeflow pipeline")
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".yaml")))
    print(compile_pipeline(parser.parse_args().output, k8s.load()))
