#!/usr/bin/env bash
# One-time GCP setup for cluster/gcp.yaml, with gcloud and an account that may create networks, firewall rules,
# service accounts and IAM bindings. From the repository root:
#
#   PROJECT=my-project BUCKET=my-run-bucket SSH_CIDR=203.0.113.7/32 cluster/gcp-setup.sh
#
# BUCKET: the run bucket (no gs:// prefix); SSH_CIDR: who may SSH to the nodes (your address /32, or your
# VPN's range; never 0.0.0.0/0); optional REGION (us-central1, as in gcp.yaml).
# It creates
#   - the network braid-ray with the subnetwork braid-ray, and two firewall rules for instances tagged braid-ray:
#     SSH (22/tcp) from SSH_CIDR only, and all traffic between braid-ray instances;
#   - the service accounts braid-ray-worker (Storage Object Admin on the bucket) and braid-ray-head (the same, plus
#     Compute Instance Admin on the project and Service Account User on braid-ray-worker, to start the workers).
# Then set provider.project_id and replace YOUR-PROJECT-ID in gcp.yaml with PROJECT.
# Written against the gcloud reference; never run by this project (checked with `bash -n` only).
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
: "${BUCKET:?set BUCKET to the run bucket name (without gs://)}"
: "${SSH_CIDR:?set SSH_CIDR to the range allowed to SSH to the nodes, e.g. your address/32}"
case "$SSH_CIDR" in
  */0) echo "SSH_CIDR=$SSH_CIDR would open SSH to the whole internet; give your own address or range" >&2; exit 1 ;;
esac
REGION=${REGION:-us-central1}

gcloud compute networks create braid-ray --project "$PROJECT" --subnet-mode custom
gcloud compute networks subnets create braid-ray --project "$PROJECT" --network braid-ray \
  --region "$REGION" --range 10.42.0.0/20
gcloud compute firewall-rules create braid-ray-ssh --project "$PROJECT" --network braid-ray \
  --direction INGRESS --allow tcp:22 --source-ranges "$SSH_CIDR" --target-tags braid-ray
gcloud compute firewall-rules create braid-ray-internal --project "$PROJECT" --network braid-ray \
  --direction INGRESS --allow tcp,udp,icmp --source-tags braid-ray --target-tags braid-ray

HEAD="braid-ray-head@$PROJECT.iam.gserviceaccount.com"
WORKER="braid-ray-worker@$PROJECT.iam.gserviceaccount.com"
gcloud iam service-accounts create braid-ray-head --project "$PROJECT" --display-name "braid-ray head"
gcloud iam service-accounts create braid-ray-worker --project "$PROJECT" --display-name "braid-ray workers"
for account in "$HEAD" "$WORKER"; do
  gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
    --member "serviceAccount:$account" --role roles/storage.objectAdmin >/dev/null
done
gcloud projects add-iam-policy-binding "$PROJECT" \
  --member "serviceAccount:$HEAD" --role roles/compute.instanceAdmin.v1 >/dev/null
gcloud iam service-accounts add-iam-policy-binding "$WORKER" --project "$PROJECT" \
  --member "serviceAccount:$HEAD" --role roles/iam.serviceAccountUser >/dev/null

echo "Done. In cluster/gcp.yaml set provider.project_id: $PROJECT and replace YOUR-PROJECT-ID with $PROJECT."
