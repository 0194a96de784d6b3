# The MLflow tracking server behind helm/coaflow-tracking: SQLite for a trial, PostgreSQL and an
# S3-compatible artifact store for real use (both chosen by the chart's values). From the root:
#   docker build -f images/tracking.Dockerfile -t ghcr.io/coaflow/coaflow-tracking:0.1.0 .
# (tagged with coaflow's version like every coaflow image; MLflow 3.17.2 inside)
# Base pinned by tag and digest; packages by images/locks/tracking.txt.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY images/locks/tracking.txt /tmp/requirements.txt
RUN pip install --no-deps -r /tmp/requirements.txt \
    && useradd --create-home --uid 1000 mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
