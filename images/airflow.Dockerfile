# Airflow with coaflow and its DAG: the scheduler, the workers and the API server run this image
# (the official chart's images.airflow); stages run in-process (local mode) or as pods of the
# coaflow images (kubernetes mode). Build from the repository root:
#   docker build -f images/airflow.Dockerfile -t ghcr.io/coaflow/coaflow-airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11
ENV GX_ANALYTICS_ENABLED=false PIP_NO_CACHE_DIR=1
USER 50000
COPY --chown=airflow:root pyproject.toml README.md /opt/coaflow/
COPY --chown=airflow:root src/ /opt/coaflow/src/
# The image's own constraints keep Airflow's pins; the provider version installs beside KFP.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install "/opt/coaflow[train]" "apache-airflow==3.3.2" \
       "apache-airflow-providers-cncf-kubernetes==10.5.0"
COPY --chown=airflow:root dags/ /opt/airflow/dags/
