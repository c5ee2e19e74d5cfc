# MLflow tracking server + model registry for docker/compose.yaml: PostgreSQL backend store,
# artifacts proxied by the server to a volume (clients need no access to the artifact storage).
FROM python:3.11-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

# The same MLflow as requirements.txt, plus the PostgreSQL driver for the backend store.
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts \
    && chown mlflow /mlartifacts

USER 1000
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
