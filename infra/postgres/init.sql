-- Runs once, on the first start of the postgres service against an empty data volume
-- (docker-entrypoint-initdb.d). Creates the two databases the team stack uses; both are owned by
-- POSTGRES_USER, the role the entrypoint runs this script as.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
