#!/bin/sh
# Run by the minio-init service, the only client of the MinIO root account: creates the buckets and one user
# per service whose policy (policies/BUCKET.json) reaches its own bucket only. Idempotent: safe on every `up`.
set -eu
here=$(dirname "$0")
mc alias set team http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null

# provision USER PASSWORD BUCKET
provision() {
    mc mb --ignore-existing "team/$3"
    mc admin policy create team "segflow-$3" "$here/policies/$3.json"
    mc admin user add team "$1" "$2"  # an existing user keeps its policies and gets this password
    # A second attach of the same policy is an error to mc (minio/mc#4863); here it means done.
    if ! attached=$(mc admin policy attach team "segflow-$3" --user "$1" 2>&1); then
        case "$attached" in
            *"already in effect"*) ;;
            *) echo "$attached" >&2; exit 1 ;;
        esac
    fi
    echo "MinIO user $1: bucket $3 only"
}

provision "$MINIO_MLFLOW_USER" "$MINIO_MLFLOW_PASSWORD" mlflow  # the MLflow server's artifact store
provision "$MINIO_WORKER_USER" "$MINIO_WORKER_PASSWORD" dvc     # the worker's DVC remote
