# The MLflow tracking server behind helm/coaflow-tracking: SQLite for a trial, PostgreSQL and an
# S3-compatible artifact store for real use (both chosen by the chart's values).
#   docker build -f images/tracking.Dockerfile -t ghcr.io/coaflow/coaflow-tracking:3.17.2 images
FROM python:3.11.14-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
    && useradd --create-home --uid 1000 mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
