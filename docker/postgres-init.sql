-- One PostgreSQL for both servers: the image creates the `mlflow` database (POSTGRES_DB);
-- this adds Prefect's. Runs once, when the data volume is initialised.
CREATE DATABASE prefect;
