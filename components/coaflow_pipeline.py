"""The Kubeflow pipeline of coaflow, compiled: ``coaflow.orchestrate.kfp.build_pipeline`` over the
Kubernetes settings both engines read (the install's values file with ``--values``, else
``$COAFLOW_K8S_CONFIG``, else coaflow's ``k8s.yaml``), shaped by a profile (synthesize shards,
TrainJob launchers: ``coaflow.orchestrate.shape``; the values file's ``global.run.profile``
unless ``--profile`` names one).

    python -m components.coaflow_pipeline            # recompile components/coaflow_pipeline.yaml
    python -m components.coaflow_pipeline --values coaflow-values.yaml --output my_pipeline.yaml
    python -m components.coaflow_pipeline --profile qwen3-0.6b-1gpu --set synthesize.shards=8 \
        --set sft.nodes=2 --set sft.gpus_per_node=8 --output my_pipeline.yaml
    coaflow run --engine kfp                         # run it here with kfp.local (no cluster)
"""

import argparse
import sys
from pathlib import Path

from coaflow.orchestrate import k8s
from coaflow.orchestrate.kfp import compile_pipeline

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile the coaflow Kubeflow pipeline")
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".yaml")))
    parser.add_argument("--values", help="the install's values file (docs/cluster.md): images, "
                        "namespace, GPU placement, profile and the runs' overrides")
    parser.add_argument("--profile", help="the profile whose shape the pipeline takes, and its "
                        "runs' default profile [the values file's, else default]")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config overrides (shape and default)")
    args = parser.parse_args()
    try:
        ks = k8s.load(args.values)
        print(compile_pipeline(args.output, ks, args.profile or ks.profile or "default",
                               args.overrides))
    except k8s.UserError as e:  # a bad values file, profile or override: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
