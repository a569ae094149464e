#!/usr/bin/env bash
# One-time AWS setup for cluster/aws.yaml, with the AWS CLI (v2) and credentials that may create IAM roles and
# security groups. From the repository root:
#
#   BUCKET=my-run-bucket SSH_CIDR=203.0.113.7/32 cluster/aws-setup.sh
#
# BUCKET: the run bucket (no s3:// prefix); SSH_CIDR: who may SSH to the nodes (your address /32, or your
# VPN's range; never 0.0.0.0/0); optional REGION (us-west-2, as in aws.yaml) and VPC_ID (default VPC).
# It creates
#   - the security group braid-ray: SSH (22/tcp) from SSH_CIDR only, all traffic between its members;
#   - the roles and instance profiles braid-ray-worker (the bucket: aws-iam-policy.json) and braid-ray-head
#     (the bucket, plus launching the workers in REGION: aws-iam-head-policy.json);
# and prints the values for YOUR-AMI-ID, YOUR-SECURITY-GROUP-ID and YOUR-ACCOUNT-ID in aws.yaml.
# Written against the AWS CLI reference; never run by this project (checked with `bash -n` only).
set -euo pipefail

: "${BUCKET:?set BUCKET to the run bucket name (without s3://)}"
: "${SSH_CIDR:?set SSH_CIDR to the range allowed to SSH to the nodes, e.g. your address/32}"
case "$SSH_CIDR" in
  */0) echo "SSH_CIDR=$SSH_CIDR would open SSH to the whole internet; give your own address or range" >&2; exit 1 ;;
esac
REGION=${REGION:-us-west-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ACCOUNT_ID=$(aws sts get-caller-identity --query Account --output text)
VPC_ID=${VPC_ID:-$(aws ec2 describe-vpcs --region "$REGION" --filters Name=is-default,Values=true \
  --query 'Vpcs[0].VpcId' --output text)}

# The policy files with the bucket, account and region filled in.
policy() {
  sed -e "s/YOUR-BUCKET/$BUCKET/g" -e "s/YOUR-ACCOUNT-ID/$ACCOUNT_ID/g" \
      -e "s/\"aws:RequestedRegion\": \"[a-z0-9-]*\"/\"aws:RequestedRegion\": \"$REGION\"/" "$HERE/$1"
}

TRUST='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
  "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'
for name in braid-ray-worker braid-ray-head; do
  aws iam create-role --role-name "$name" --assume-role-policy-document "$TRUST" >/dev/null
  aws iam put-role-policy --role-name "$name" --policy-name braid-ray-run-bucket \
    --policy-document "$(policy aws-iam-policy.json)"
  aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
done
aws iam put-role-policy --role-name braid-ray-head --policy-name braid-ray-autoscaler \
  --policy-document "$(policy aws-iam-head-policy.json)"

SG_ID=$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name braid-ray \
  --description "braid-ray: SSH from $SSH_CIDR, all traffic between members" --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" \
  --protocol tcp --port 22 --cidr "$SSH_CIDR" >/dev/null
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG_ID" \
  --protocol=-1 --source-group "$SG_ID" >/dev/null

# The current Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) of the region, to pin in aws.yaml.
AMI_ID=$(aws ssm get-parameter --region "$REGION" --query Parameter.Value --output text \
  --name /aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id)

cat <<EOF
Done. In cluster/aws.yaml replace
  YOUR-AMI-ID             with $AMI_ID
  YOUR-SECURITY-GROUP-ID  with $SG_ID
  YOUR-ACCOUNT-ID         with $ACCOUNT_ID
and, if REGION is not us-west-2, provider.region and availability_zone. New instance profiles take up to a
minute to become usable by EC2.
EOF
