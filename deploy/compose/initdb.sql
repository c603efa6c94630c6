-- One database per user of PostgreSQL: the Iceberg catalog, MLflow's tracking store, Dagster's instance.
CREATE DATABASE keel_catalog;
CREATE DATABASE mlflow;
CREATE DATABASE dagster;
