#!/usr/bin/env bash
# Deploy GBX Entitlements to a Google Cloud project: APIs, runtime service account, Firestore,
# Cloud KMS seal key, admin-token secret, the eight Cloud Functions (gen2) and their audiences.
#
#   ./deploy.sh --project PROJECT --region REGION [--dry-run]
#
# Safe to re-run: every create is guarded by a describe, every grant is an idempotent
# add-iam-policy-binding, every deploy replaces the previous revision.
# --dry-run prints each command it would run ("+ ..." lines, shell-quoted, in order) and runs none:
# no gcloud, firebase, openssl or network call. Staging build/functions/ is local and happens in
# both modes, so CI can inspect what would be uploaded.
#
# Environment:
#   GBX_OPERATORS           comma-separated operator emails handed to the functions (may be empty)
#   GBX_BUILD_DIR           where functions are staged (default: build, next to this script)
#   GBX_FIRESTORE_LOCATION  Firestore location for a new database (default: REGION; e.g. eur3, nam5)
#
# Prerequisites the script does not handle: billing on the project; a deploying identity that may
# enable services, create service accounts, set IAM policies and act as gbx-runtime; an org policy
# that allows allUsers invokers (see "allow-unauthenticated" below).
set -euo pipefail

readonly ENTRIES=(issue check consume run_start run_complete seal_verify redeem_seal_once public_keys)
readonly APIS=(
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
  artifactregistry.googleapis.com firestore.googleapis.com cloudkms.googleapis.com
  secretmanager.googleapis.com iam.googleapis.com logging.googleapis.com
  firebaserules.googleapis.com
)
readonly SA_NAME=gbx-runtime
readonly KEY_RING=gbx
readonly KEY=seal
readonly SECRET=gbx-admin-token
readonly DATABASE='(default)'

usage() {
  cat <<'EOF'
usage: deploy.sh --project PROJECT --region REGION [--dry-run]

  --project PROJECT   Google Cloud project to deploy into
  --region REGION     region of the functions and the KMS key ring (e.g. europe-west1)
  --dry-run           print every command that would run (prefixed "+ "), run none
EOF
}

bad_usage() {
  printf 'deploy.sh: %s\n' "$1" >&2
  usage >&2
  exit 2
}

PROJECT=""
REGION=""
DRY_RUN=0
while (($#)); do
  case "$1" in
    --project | --region)
      (($# >= 2)) || bad_usage "$1 needs a value"
      if [[ $1 == --project ]]; then PROJECT=$2; else REGION=$2; fi
      shift 2
      ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --region=*) REGION=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown argument: $1" ;;
  esac
done
[[ -n $PROJECT ]] || bad_usage "--project is required"
[[ -n $REGION ]] || bad_usage "--region is required"
# Both end up inside resource names, URLs and gcloud dict flags: refuse anything unusual.
[[ $PROJECT =~ ^[a-z][a-z0-9.:-]*[a-z0-9]$ ]] || bad_usage "not a Google Cloud project ID: $PROJECT"
[[ $REGION =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || bad_usage "not a Google Cloud region: $REGION"
OPERATORS=${GBX_OPERATORS:-}
[[ $OPERATORS != *";"* ]] || bad_usage "GBX_OPERATORS must not contain ';'"
FIRESTORE_LOCATION=${GBX_FIRESTORE_LOCATION:-$REGION}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_DIR=${GBX_BUILD_DIR:-build}
if [[ -n ${GBX_BUILD_DIR:-} && $BUILD_DIR != /* ]]; then
  BUILD_DIR="$PWD/$BUILD_DIR" # relative to where the operator stands, not to the checkout
fi
cd "$ROOT" # firebase reads firebase.json from the working directory; the default build dir is here

SA_EMAIL="$SA_NAME@$PROJECT.iam.gserviceaccount.com"
KEY_NAME="projects/$PROJECT/locations/$REGION/keyRings/$KEY_RING/cryptoKeys/$KEY"
export CLOUDSDK_CORE_DISABLE_PROMPTS=1 # a prompt would hang CI; every answer is in the flags

# fd 3 is the operator's stdout, so commands are shown even from inside $(...).
exec 3>&1

quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=" $arg"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

show() { printf '+ %s\n' "$(quote "$@")" >&3; }
note() { printf '# %s\n' "$*" >&3; }
die() { printf 'deploy.sh: error: %s\n' "$*" >&2; exit 1; }

# Show a command; run it unless this is a dry run. Its stdout is the caller's (capturable).
run() {
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

# Show a describe/list command; print what it finds, or nothing when the resource is absent.
# A dry run finds nothing, so it goes on to show the creates that a first deployment runs.
probe() {
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@" 2>/dev/null || true
}

# New service accounts take a while to be visible to IAM; retry grants a few times.
retry() {
  local attempt
  for attempt in 1 2 3 4 5; do
    if "$@"; then return 0; fi
    ((attempt < 5)) || break
    note "failed; retrying in $((attempt * 5))s"
    sleep $((attempt * 5))
  done
  return 1
}

function_name() { printf 'gbx-%s' "${1//_/-}"; }

function_url() {
  probe gcloud functions describe "$(function_name "$1")" --gen2 --region="$REGION" --project="$PROJECT" \
    --format='value(serviceConfig.uri)'
}

# --- 1. Stage each function: its main.py + shared/ (minus local-mode modules) + requirements.txt.
stage() {
  local entry=$1
  local source="functions/$entry/main.py" dest="$BUILD_DIR/functions/$entry"
  [[ -f $source ]] || die "$source is missing"
  rm -rf -- "$dest"
  mkdir -p -- "$dest"
  cp -- "$source" "$dest/main.py"
  cp -- requirements.txt "$dest/requirements.txt"
  cp -R -- shared "$dest/shared"
  find "$dest/shared" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf -- {} +
  # local.py serves everything on one port with local keys; emulator.py starts the emulator.
  rm -f -- "$dest/shared/local.py" "$dest/shared/emulator.py"
  note "staged $source -> $dest"
}
for entry in "${ENTRIES[@]}"; do stage "$entry"; done

if ((DRY_RUN)); then
  note "dry run: showing the commands for project $PROJECT in $REGION; none of them runs"
fi

# --- 2. APIs (enabling an enabled API is a no-op).
run gcloud services enable "${APIS[@]}" --project="$PROJECT"

# --- 3. Runtime service account, least privilege: Firestore on the project, the rest per resource.
sa_found=$(probe gcloud iam service-accounts describe "$SA_EMAIL" --project="$PROJECT" --format='value(email)')
if [[ -z $sa_found ]]; then
  run gcloud iam service-accounts create "$SA_NAME" --project="$PROJECT" \
    --display-name="GBX Entitlements runtime"
fi
retry run gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA_EMAIL" \
  --role=roles/datastore.user --condition=None --format=none

# --- 4. Firestore (native mode), its indexes and its security rules.
db_type=$(probe gcloud firestore databases describe --database="$DATABASE" --project="$PROJECT" --format='value(type)')
if [[ -z $db_type ]]; then
  run gcloud firestore databases create --database="$DATABASE" --location="$FIRESTORE_LOCATION" \
    --type=firestore-native --project="$PROJECT"
elif [[ $db_type != FIRESTORE_NATIVE ]]; then
  die "the (default) Firestore database of $PROJECT is $db_type; GBX needs Firestore in native mode"
fi

# One line of gcloud flags per index of firestore.indexes.json (the firebase-tools format).
index_lines=$(python3 - firestore.indexes.json <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as file:
    document = json.load(file)
if document.get("fieldOverrides"):
    sys.exit("deploy.sh: fieldOverrides are not supported; deploy them with firebase deploy --only firestore:indexes")
for index in document.get("indexes", []):
    flags = [
        "--collection-group=" + index["collectionGroup"],
        "--query-scope=" + index.get("queryScope", "COLLECTION").lower().replace("_", "-"),
    ]
    for field in index["fields"]:
        if "order" in field:
            config = f"field-path={field['fieldPath']},order={field['order'].lower()}"
        elif "arrayConfig" in field:
            config = f"field-path={field['fieldPath']},array-config={field['arrayConfig'].lower()}"
        else:
            sys.exit(f"deploy.sh: unsupported index field {field!r}")
        flags.append("--field-config=" + config)
    print("\t".join(flags))
PY
)
create_index() {
  local err
  show gcloud firestore indexes composite create "$@" --project="$PROJECT"
  if ((DRY_RUN)); then return 0; fi
  # There is no describe for "this exact index": create it and accept ALREADY_EXISTS (HTTP 409).
  # Not --async: creating indexes on one collection concurrently can fail with a 409 as well.
  if ! err=$(gcloud firestore indexes composite create "$@" --project="$PROJECT" 2>&1 >/dev/null); then
    if grep -qiE 'ALREADY_EXISTS|already exists' <<<"$err"; then
      note "index exists: $*"
      return 0
    fi
    printf '%s\n' "$err" >&2
    return 1
  fi
}
while IFS=$'\t' read -r -a index_flags; do
  ((${#index_flags[@]})) || continue
  create_index "${index_flags[@]}"
done <<<"$index_lines"

# Rules: the functions reach Firestore with IAM credentials, which rules do not govern; the rules
# deny every client (mobile/web SDK, REST with end-user tokens) on every path. gcloud cannot
# release rules; the Firebase CLI can, on a project with Firebase added
# (firebase projects:addfirebase PROJECT).
if ((DRY_RUN)) || command -v firebase >/dev/null 2>&1; then
  run firebase deploy --only firestore:rules --project "$PROJECT" --non-interactive
else
  note "firebase CLI not found: firestore.rules was NOT deployed. Deploy it from $ROOT with:"
  note "  $(quote firebase deploy --only firestore:rules --project "$PROJECT")"
fi

# --- 5. Admin token: a random secret in Secret Manager that only gbx-issue can read.
secret_found=$(probe gcloud secrets describe "$SECRET" --project="$PROJECT" --format='value(name)')
if [[ -z $secret_found ]]; then
  run gcloud secrets create "$SECRET" --replication-policy=automatic --project="$PROJECT"
fi
# Checked apart from the secret, so that a run interrupted between the two steps is repaired.
secret_version=$(probe gcloud secrets versions list "$SECRET" --project="$PROJECT" --filter=state=ENABLED --limit=1 \
  --format='value(name)')
if [[ -z $secret_version ]]; then
  # The value goes from openssl to gcloud through a pipe: never in argv, a variable or the output.
  printf '+ %s | %s | %s\n' "$(quote openssl rand -hex 32)" "$(quote tr -d '\n')" \
    "$(quote gcloud secrets versions add "$SECRET" --data-file=- --project="$PROJECT")" >&3
  if ((!DRY_RUN)); then
    openssl rand -hex 32 | tr -d '\n' | gcloud secrets versions add "$SECRET" --data-file=- --project="$PROJECT"
  fi
  note "a new admin token is stored in Secret Manager; read it with:" \
    "gcloud secrets versions access latest --secret=$SECRET --project=$PROJECT"
fi
retry run gcloud secrets add-iam-policy-binding "$SECRET" --project="$PROJECT" \
  --member="serviceAccount:$SA_EMAIL" --role=roles/secretmanager.secretAccessor --condition=None --format=none

# --- 6. Seal key: an EC P-256 signing key in Cloud KMS. signerVerifier on this key alone covers
# asymmetricSign and getPublicKey (cloudkms.cryptoKeyVersions.viewPublicKey); nothing else needed.
key_ring_found=$(probe gcloud kms keyrings describe "$KEY_RING" --location="$REGION" --project="$PROJECT" --format='value(name)')
if [[ -z $key_ring_found ]]; then
  run gcloud kms keyrings create "$KEY_RING" --location="$REGION" --project="$PROJECT"
fi
key_algorithm=$(probe gcloud kms keys describe "$KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
  --format='value(versionTemplate.algorithm)')
if [[ -z $key_algorithm ]]; then
  run gcloud kms keys create "$KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
    --purpose=asymmetric-signing --default-algorithm=ec-sign-p256-sha256
elif [[ $key_algorithm != EC_SIGN_P256_SHA256 ]]; then
  die "$KEY_NAME exists with algorithm $key_algorithm; seals need EC_SIGN_P256_SHA256"
fi
retry run gcloud kms keys add-iam-policy-binding "$KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
  --member="serviceAccount:$SA_EMAIL" --role=roles/cloudkms.signerVerifier --condition=None --format=none

# Sign with the newest ENABLED version; trust every ENABLED version, so that seals signed before a
# rotation keep verifying (a disabled or destroyed version no longer yields its public key).
list_enabled_versions() {
  run gcloud kms keys versions list --key="$KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
    --filter=state=ENABLED --sort-by=~createTime --format='value(name)'
}
if ((DRY_RUN)); then
  list_enabled_versions
  SIGNING_VERSION="$KEY_NAME/cryptoKeyVersions/1"
  TRUSTED_VERSIONS=$SIGNING_VERSION
  note "dry run: the key version below is a placeholder for the newest ENABLED version: $SIGNING_VERSION"
else
  versions=""
  for attempt in 1 2 3 4 5 6 7 8 9 10 11 12; do
    versions=$(list_enabled_versions)
    [[ -z $versions ]] || break
    # A new asymmetric key's first version is PENDING_GENERATION for a little while.
    note "waiting for an ENABLED version of $KEY_NAME (attempt $attempt)"
    sleep 5
  done
  [[ -n $versions ]] || die "$KEY_NAME has no ENABLED version"
  SIGNING_VERSION=$(head -n 1 <<<"$versions")
  TRUSTED_VERSIONS=$(paste -sd, - <<<"$versions")
fi

# --- 7. The eight functions.
# --allow-unauthenticated: Cloud Run's IAM check is off because each function verifies the caller
# itself (Google ID token with this deployment's audiences, or the admin token), so that 401/403
# come with the contract's JSON bodies; public_keys is public by design.
# GBX_AUDIENCES are the function URLs, known only after a first deployment (step 8). A redeploy
# replaces the service's environment, so the URLs known now go in at once: no window of 401s.
known_urls=()
for entry in "${ENTRIES[@]}"; do
  url=$(function_url "$entry")
  if [[ -n $url ]]; then known_urls+=("$url"); fi
done
KNOWN_AUDIENCES=$(IFS=,; printf '%s' "${known_urls[*]}")

env_vars="^;^GOOGLE_CLOUD_PROJECT=$PROJECT;GBX_ISSUER=$PROJECT"
env_vars+=";GBX_KMS_KEY_VERSION=$SIGNING_VERSION;GBX_TRUSTED_KEY_VERSIONS=$TRUSTED_VERSIONS"
if [[ -n $OPERATORS ]]; then env_vars+=";GBX_OPERATORS=$OPERATORS"; fi
if [[ -n $KNOWN_AUDIENCES ]]; then env_vars+=";GBX_AUDIENCES=$KNOWN_AUDIENCES"; fi

for entry in "${ENTRIES[@]}"; do
  deploy=(gcloud functions deploy "$(function_name "$entry")" --gen2 --runtime=python312 --trigger-http
    --allow-unauthenticated --entry-point="$entry" --source="$BUILD_DIR/functions/$entry"
    --region="$REGION" --project="$PROJECT" --service-account="$SA_EMAIL" --set-env-vars="$env_vars")
  if [[ $entry == issue ]]; then
    deploy+=(--set-secrets="GBX_ADMIN_TOKEN=$SECRET:latest") # the only function that sees the token
  fi
  run "${deploy[@]}"
done

# --- 8. Audiences: every function accepts ID tokens minted for any of the deployment's URLs.
urls=()
for entry in "${ENTRIES[@]}"; do
  url=$(function_url "$entry")
  if ((DRY_RUN)); then url="https://$(function_name "$entry")-PLACEHOLDER.$REGION.run.app"; fi
  [[ -n $url ]] || die "no URL for $(function_name "$entry")"
  urls+=("$url")
done
AUDIENCES=$(IFS=,; printf '%s' "${urls[*]}")
if [[ $AUDIENCES == "$KNOWN_AUDIENCES" ]]; then
  note "GBX_AUDIENCES unchanged; already set by the deploys"
else
  # A gen2 function is a Cloud Run service of the same name: updating its environment makes a new
  # revision without a rebuild. Step 7 carries the value on every later redeploy.
  for entry in "${ENTRIES[@]}"; do
    run gcloud run services update "$(function_name "$entry")" --region="$REGION" --project="$PROJECT" \
      --update-env-vars="^;^GBX_AUDIENCES=$AUDIENCES"
  done
fi

echo
if ((DRY_RUN)); then echo "Function URLs (placeholders; a dry run deploys nothing):"; else echo "Function URLs:"; fi
for i in "${!ENTRIES[@]}"; do
  printf '  %-22s %s\n' "$(function_name "${ENTRIES[$i]}")" "${urls[$i]}"
done
echo "Admin token: gcloud secrets versions access latest --secret=$SECRET --project=$PROJECT"
