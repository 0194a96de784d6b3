# Airflow with coaflow and its DAG: the scheduler, the workers and the API server run this image
# (the official chart's images.airflow); stages run in-process (local mode) or as pods of the
# coaflow images (kubernetes mode). It runs as uid 50000, the official image's `airflow` user that
# the official chart expects; the coaflow images (stage pods) run as 1000. Build from the root:
#   docker build -f images/airflow.Dockerfile -t ghcr.io/coaflow/coaflow-airflow:0.1.0 .
# Base pinned by tag only: no public source here gave its digest (pin it where you mirror it).
# Packages by images/locks/airflow.txt.
FROM apache/airflow:3.3.2-python3.11
ENV GX_ANALYTICS_ENABLED=false PIP_NO_CACHE_DIR=1
USER 50000
# Dependencies first, exactly as locked (torch's CPU build): a change under src/ or dags/ never
# reinstalls them.
COPY --chown=airflow:root images/locks/airflow.txt /opt/coaflow/requirements.txt
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple -r /opt/coaflow/requirements.txt
COPY --chown=airflow:root pyproject.toml README.md /opt/coaflow/
COPY --chown=airflow:root src/ /opt/coaflow/src/
RUN pip install --no-deps /opt/coaflow
# The DAG and its settings file side by side: the DAG reads the file next to itself.
COPY --chown=airflow:root dags/ /opt/airflow/dags/
