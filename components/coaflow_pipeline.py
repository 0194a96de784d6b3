"""The Kubeflow pipeline of coaflow, compiled: ``coaflow.orchestrate.kfp.build_pipeline`` over the
Kubernetes settings both engines read (coaflow's ``k8s.yaml``, or ``$COAFLOW_K8S_CONFIG``), shaped
by a profile (synthesize shards, TrainJob launchers: ``coaflow.orchestrate.shape``).

    python -m components.coaflow_pipeline            # recompile components/coaflow_pipeline.yaml
    python -m components.coaflow_pipeline --profile qwen3-0.6b-1gpu --set synthesize.shards=8 \
        --set sft.nodes=2 --set sft.gpus_per_node=8 --output my_pipeline.yaml
    coaflow run --engine kfp                         # run it here with kfp.local (no cluster)
"""

import argparse
from pathlib import Path

from coaflow.orchestrate import k8s
from coaflow.orchestrate.kfp import compile_pipeline

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile the coaflow Kubeflow pipeline")
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".yaml")))
    parser.add_argument("--profile", default="default", help="the profile whose shape the "
                        "pipeline takes, and its runs' default profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config overrides (shape and default)")
    args = parser.parse_args()
    print(compile_pipeline(args.output, k8s.load(), args.profile, args.overrides))
