"""
### coaflow retraining

Retrains the coaflow agent on a schedule or on demand: one task per pipeline stage
(`coaflow.contract.ORDER`, the stages whose module exists), each running the one stage entry
point `coaflow stage NAME --out <workdir>/runs/<run id>/NAME --input STAGE=DIR`.

- **configure** checks the trigger form against the config model (a bad value fails here, before
  any work) and hands every stage the profile, the overrides and the run's folder.
- **Stages** pass folders and `result.json` through XCom, never data. Exit 75 (an endpoint or
  MLflow unavailable) is retried with backoff; bad input (2), a refused data gate (3) and bugs
  (1) fail at once; a failure is recorded on the run in MLflow.
- **promotion** branches on the register stage's decision: deploy runs only after a promotion
  (a refused promotion is a decision, not a failure).

Mode (`COAFLOW_AIRFLOW_MODE`): `local` runs each stage in a subprocess on the worker;
`kubernetes` runs the same argv in a pod of the coaflow image (GPUs for sft, rl, evaluate).
Settings: `coaflow_retrain.yaml` beside this file; pods: coaflow's `k8s.yaml`. Docs: `docs/airflow.md`.

**Shape** (from the settings' profile when the DAG is parsed; a run of another shape fails at
configure): `synthesize.shards` > 1 maps synthesize over its shards (the gate reads them all);
an sft or rl past one GPU process runs a launcher that submits a Kubeflow Trainer TrainJob and
waits for it (`docs/cluster.md`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, chain, dag, task

from coaflow.contract import ORDER, PROMOTION
from coaflow.orchestrate import airflow as af
from coaflow.orchestrate import airflow_pods as ap
from coaflow.orchestrate.shape import SHARDED

# the settings file beside this one, wherever the DAG folder is (/opt/airflow/dags in the image)
SETTINGS = af.load_settings(default=Path(__file__).with_name("coaflow_retrain.yaml"))
FORM = af.trigger_params(SETTINGS, list(ORDER))
SHAPE = af.dag_shape(SETTINGS)


def local_stage(name: str):
    @task(task_id=name, doc_md=f"Launches a TrainJob on {SHAPE.launched[name]} (nodes, GPUs)"
          if name in SHAPE.launched else None)
    def stage(shard=None, **context):
        ti = context["ti"]
        return af.run_local(name, ti.xcom_pull(task_ids="configure"),
                            af.pull_inputs(ti, name, context["dag"].task_ids), SETTINGS.python,
                            shard=shard, ks=SETTINGS.kubernetes)

    if name == SHARDED and SHAPE.shards > 1:
        return stage.expand(shard=list(range(SHAPE.shards)))
    return stage()


@dag(
    dag_id="coaflow_retrain",
    schedule=SETTINGS.schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=SETTINGS.tags,
    doc_md=__doc__,
    params={k: Param(v["default"], description=v["description"], **v["schema"])
            for k, v in FORM.items()},
    default_args={
        "owner": SETTINGS.owner,
        "retries": SETTINGS.retries,
        "retry_delay": timedelta(seconds=SETTINGS.retry_delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=SETTINGS.max_retry_delay_s),
        "on_failure_callback": af.record_failure,
    },
)
def coaflow_retrain():
    @task(retries=0)
    def configure(**context):
        try:
            return af.plan(context["params"], context["run_id"], SETTINGS, list(ORDER))
        except af.UserError as e:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(e)) from None

    stages = {n: local_stage(n) if SETTINGS.mode == "local"
              else ap.pod_operator(n, SETTINGS, SHAPE) for n in ORDER}
    names = list(stages)
    cut = names.index(PROMOTION) + 1 if PROMOTION in names else len(names)
    chain(configure(), *[stages[n] for n in names[:cut]])
    if cut < len(names):  # the stages after a promotion decision run only when it promoted
        from airflow.providers.standard.operators.empty import EmptyOperator

        @task.branch(retries=0)
        def promotion(**context):
            decision = context["ti"].xcom_pull(task_ids=PROMOTION) or {}
            return names[cut] if decision.get("promoted") else "not_promoted"

        branch = promotion()
        chain(stages[names[cut - 1]], branch, EmptyOperator(task_id="not_promoted"))
        chain(branch, *[stages[n] for n in names[cut:]])

coaflow_retrain()
