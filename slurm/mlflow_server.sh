#!/usr/bin/env bash
# slurm/mlflow_server.sh - one MLflow tracking server for every job of a cluster (all runs, all sweeps, one
# store to compare in). Run it on a login or service node that the compute nodes reach, or submit it as a
# long job:
#
#   slurm/mlflow_server.sh [--dir DIR] [--port PORT] [--host HOST]      # in the foreground (tmux/screen)
#   sbatch --time=7-00:00:00 --cpus-per-task=2 slurm/mlflow_server.sh --dir /shared/mlflow
#
# DIR (default $HOME/maven-mlflow) holds the store (mlflow.db, SQLite: only this server writes it, so keep
# it on a local or reliably locking disk) and the artifacts (DIR/artifacts, served through the server, so
# jobs need no access to DIR). MAVEN_MLFLOW_BACKEND=postgresql://... uses a database server instead.
# The server's URI is written to DIR/tracking_uri; point every job at it once, in slurm/env.sh:
#
#   export MAVEN_TRACKING_URI=http://HOST:PORT       # recipes' tracking.uri, when set, still wins
#
# and compare there: maven compare --uri http://HOST:PORT --sweep NAME --html report.html
set -euo pipefail
dir=$HOME/maven-mlflow
port=5000
host=""
while [ $# -gt 0 ]; do
    case $1 in
        --dir) dir=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "mlflow_server.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mlflow=${MAVEN_MLFLOW:-$here/.venv/bin/mlflow}
[ -x "$mlflow" ] || mlflow=$(command -v mlflow) || { echo "mlflow_server.sh: no mlflow executable (make setup)" >&2; exit 2; }
mkdir -p "$dir/artifacts"
backend=${MAVEN_MLFLOW_BACKEND:-sqlite:///$dir/mlflow.db}
host=${host:-$(hostname -f 2>/dev/null || hostname)}
echo "http://$host:$port" > "$dir/tracking_uri"
echo "[mlflow_server] http://$host:$port  store $backend  artifacts $dir/artifacts"
echo "[mlflow_server] jobs: export MAVEN_TRACKING_URI=http://$host:$port   (slurm/env.sh)"
exec "$mlflow" server --backend-store-uri "$backend" --artifacts-destination "$dir/artifacts" \
    --serve-artifacts --host 0.0.0.0 --port "$port"
