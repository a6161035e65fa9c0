#!/bin/sh
# Healthcheck of the compose broker. It passes when the node is running and each user
# can log in with the password from its secret file. A user that is missing, or whose
# password differs, is created or updated first, with full permissions on the vhost "/".
# Users are not in definitions.json: see rabbitmq.conf for why.
set -eu

secrets_dir=${SECRETS_DIR:-/run/secrets}

rabbitmq-diagnostics -q check_running >/dev/null

# ensure_user NAME SECRET_FILE [TAG...]
ensure_user() {
    name=$1
    secret_file=$secrets_dir/$2
    shift 2
    if [ ! -s "$secret_file" ]; then
        echo "ensure-users: password file $secret_file is missing or empty" >&2
        exit 1
    fi
    password=$(cat "$secret_file")
    if rabbitmqctl -q authenticate_user "$name" "$password" >/dev/null 2>&1; then
        return 0
    fi
    if ! rabbitmqctl -q add_user "$name" "$password" >/dev/null 2>&1; then
        rabbitmqctl -q change_password "$name" "$password" >/dev/null
    fi
    rabbitmqctl -q set_user_tags "$name" "$@" >/dev/null
    rabbitmqctl -q set_permissions -p / "$name" '.*' '.*' '.*' >/dev/null
    rabbitmqctl -q authenticate_user "$name" "$password" >/dev/null
}

ensure_user "${RABBITMQ_ADMIN_USER:-admin}" rabbitmq_admin_password administrator
ensure_user "${RABBITMQ_WORKER_USER:-transform-worker}" rabbitmq_worker_password
