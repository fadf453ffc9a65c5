-- Run once by the postgres image when its data volume is first initialised (docker-compose.yml mounts this
-- directory at /docker-entrypoint-initdb.d): MLflow keeps its runs and model registry in its own database.
CREATE DATABASE mlflow;
-- MLflow's users and permissions (its basic-auth app).
CREATE DATABASE mlflow_auth;
