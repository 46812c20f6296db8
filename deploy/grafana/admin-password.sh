#!/bin/sh
# Grafana's entrypoint in docker-compose.yml: an admin password that is never a shared default.
# GRAFANA_ADMIN_PASSWORD when the operator sets one; else one generated on the first start and
# kept in Grafana's data volume, so `docker compose up` needs no setting and admin/admin never
# exists (docs/deployment.md, "Reading the dashboard"). Grafana applies it when its database is
# first created.
set -eu
file="${GRAFANA_PASSWORD_FILE:-/var/lib/grafana/admin-password}"
if [ -n "${GRAFANA_ADMIN_PASSWORD:-}" ]; then
  GF_SECURITY_ADMIN_PASSWORD="$GRAFANA_ADMIN_PASSWORD"
else
  if [ ! -s "$file" ]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$file")
    echo "grafana: generated the admin password into $file; read it with:" \
      "docker compose exec grafana cat $file" >&2
  fi
  GF_SECURITY_ADMIN_PASSWORD="$(cat "$file")"
fi
export GF_SECURITY_ADMIN_PASSWORD
[ "$#" -gt 0 ] || set -- /run.sh
exec "$@"
