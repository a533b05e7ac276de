#!/bin/sh
# minio-init: the models bucket, then one MinIO user per component with its
# own policy: the scorer's reads the model prefix, the trainer's also writes
# it. Their keys come from scorer.env and trainer.env (mounted read-only);
# the root credentials (minio.env) are used here and nowhere else. Safe to
# run again: policies and secrets are updated, attaching twice is not an error.
set -eu
# The root login through the environment, not on mc's command line.
export MC_HOST_local="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@minio:9000"
mc mb --ignore-existing local/models

for component in scorer trainer; do
  (
    # shellcheck disable=SC1090
    . "/run/fraudstream/${component}.env"
    policy="fraudstream-${component}"
    mc admin policy create local "${policy}" "/run/fraudstream/minio/${component}-policy.json"
    mc admin user add local "${AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY}"
    if ! out="$(mc admin policy attach local "${policy}" --user "${AWS_ACCESS_KEY_ID}" 2>&1)"; then
      case "${out}" in
        *"already in effect"*) ;;
        *) echo "${out}" >&2; exit 1 ;;
      esac
    fi
    echo "user ${AWS_ACCESS_KEY_ID}: policy ${policy}"
  )
done
