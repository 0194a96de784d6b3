"""Orchestration: the engines that run coaflow's stages on a cluster, over one stage graph
(``coaflow.contract``), one command line (``command``) and one Kubernetes settings file (``k8s``).

- ``command``: ``coaflow stage NAME --config ... --out ... --input STAGE=DIR``, the one command
  every task runs, whichever engine starts it.
- ``k8s``: the settings of every stage pod (``k8s.yaml``): image, CPU/memory, GPUs, PVC, secrets.
- ``airflow``: what the DAG ``dags/coaflow_retrain.py`` needs (the trigger form, pods, exit codes).
- ``kfp``: the Kubeflow pipeline (``components/coaflow_pipeline.py`` compiles it) and its tasks' body.
- ``trainjob``: a training stage past one GPU process, as a Kubeflow Trainer ``TrainJob``, and
  the launch step both engines run to submit it and wait for it.
- ``shape``: how many synthesize shards and which stages launch a TrainJob, read from a profile
  when an engine builds its graph, and checked against each run's config.
"""
