#!/usr/bin/env bash
# Deploy GBX Entitlements to a Google Cloud project: APIs, runtime and build service accounts,
# Firestore, Cloud KMS seal key, admin-token secret, the eight Cloud Functions (gen2), their
# audiences and, last, the Firestore security rules.
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
# enable services, create service accounts, set the project's IAM policy, update Cloud Run
# services (roles/run.admin) and act as gbx-runtime and gbx-build (roles/iam.serviceAccountUser on
# both). The Firestore rules additionally need Firebase added to the project and a Firebase CLI
# that is logged in (firebase login, or GOOGLE_APPLICATION_CREDENTIALS); without them the script
# warns and carries on.
set -euo pipefail

readonly ENTRIES=(issue check consume run_start run_complete seal_verify redeem_seal_once public_keys)
# Deploy order. After a key rotation every function gets the new signing version, but only
# run_complete signs: the functions that verify seals or publish the keys go first, so the new
# version is trusted everywhere before the first seal is signed with it; run_complete goes last.
readonly DEPLOY_ORDER=(seal_verify redeem_seal_once public_keys issue check consume run_start run_complete)
readonly APIS=(
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
  artifactregistry.googleapis.com firestore.googleapis.com cloudkms.googleapis.com
  secretmanager.googleapis.com iam.googleapis.com logging.googleapis.com
  firebaserules.googleapis.com
)
readonly SA_NAME=gbx-runtime
# Builds run as gbx-build: since mid-2024 new projects build with the default compute service
# account, which organisations often strip of the Editor role the build relied on.
readonly BUILD_SA_NAME=gbx-build
readonly BUILD_ROLES=(roles/logging.logWriter roles/artifactregistry.writer roles/storage.objectAdmin)
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
# Both end up inside resource names, URLs and gcloud dict flags: refuse anything unusual. Legacy
# domain-scoped IDs (example.com:name) are refused too: their service-account emails and
# cloudfunctions.net host names have another shape.
# Letters, digits and hyphens only: a domain-scoped ID (example.com:proj) would make wrong service-account
# emails. Length is left to gcloud (real IDs have 6 to 30 characters), so the documented `--project demo`
# dry run works.
[[ $PROJECT =~ ^[a-z][a-z0-9-]{0,28}[a-z0-9]$ ]] || bad_usage "not a Google Cloud project ID: $PROJECT"
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
BUILD_SA_EMAIL="$BUILD_SA_NAME@$PROJECT.iam.gserviceaccount.com"
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
warn() { printf 'deploy.sh: warning: %s\n' "$*" >&2; }

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

# --- 1. Stage each function: its main.py + shared/ (minus local-mode modules) + gbx_client/ + requirements.txt.
stage() {
  local entry=$1
  local source="functions/$entry/main.py" dest="$BUILD_DIR/functions/$entry"
  [[ -f $source ]] || die "$source is missing"
  rm -rf -- "$dest"
  mkdir -p -- "$dest"
  cp -- "$source" "$dest/main.py"
  cp -- requirements.txt "$dest/requirements.txt"
  cp -R -- shared "$dest/shared"
  # The seal format lives in the runner client's package, once for both: ship that module's package.
  cp -R -- client/gbx_client "$dest/gbx_client"
  find "$dest/shared" "$dest/gbx_client" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf -- {} +
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

# --- 3. Service accounts.
ensure_service_account() {
  local name=$1 display_name=$2 found
  found=$(probe gcloud iam service-accounts describe "$name@$PROJECT.iam.gserviceaccount.com" --project="$PROJECT" \
    --format='value(email)')
  if [[ -z $found ]]; then
    run gcloud iam service-accounts create "$name" --project="$PROJECT" --display-name="$display_name"
  fi
}
grant_on_project() {
  retry run gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$1" --role="$2" \
    --condition=None --format=none
}
# The functions run as gbx-runtime, least privilege: Firestore on the project, the rest per resource.
ensure_service_account "$SA_NAME" "GBX Entitlements runtime"
grant_on_project "$SA_EMAIL" roles/datastore.user
# Cloud Build runs as gbx-build: build logs, the function images in Artifact Registry, the uploaded
# sources in Cloud Storage.
ensure_service_account "$BUILD_SA_NAME" "GBX Entitlements build"
for role in "${BUILD_ROLES[@]}"; do grant_on_project "$BUILD_SA_EMAIL" "$role"; done

# --- 4. Firestore (native mode) and its indexes (its rules are the last step).
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
# A version that is still PENDING_GENERATION (a new key, or a rotation moments ago) is waited for,
# up to 2 minutes: deploying without it would leave the new version neither signing nor trusted.
list_key_versions() {
  run gcloud kms keys versions list --key="$KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
    --sort-by=~createTime --format='value(name,state)'
}
if ((DRY_RUN)); then
  list_key_versions
  SIGNING_VERSION="$KEY_NAME/cryptoKeyVersions/1"
  TRUSTED_VERSIONS=$SIGNING_VERSION
  note "dry run: the key version below is a placeholder for the newest ENABLED version: $SIGNING_VERSION"
else
  versions="" pending=""
  for attempt in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24; do
    listing=$(list_key_versions)
    versions=$(awk '$2 == "ENABLED" { print $1 }' <<<"$listing")
    pending=$(awk '$2 == "PENDING_GENERATION" { print $1 }' <<<"$listing")
    [[ -n $pending || -z $versions ]] || break
    # Versions that exist but are neither ENABLED nor being generated will not become ENABLED.
    [[ -n $pending || -z $listing ]] || die "$KEY_NAME has no ENABLED version; enable one or create a new one"
    ((attempt < 24)) || break
    if [[ -n $pending ]]; then
      note "waiting for $(paste -sd' ' - <<<"$pending") to leave PENDING_GENERATION (attempt $attempt)"
    else
      note "waiting for an ENABLED version of $KEY_NAME (attempt $attempt)"
    fi
    sleep 5
  done
  [[ -z $pending ]] || die "key versions still PENDING_GENERATION after 2 minutes: $(paste -sd' ' - <<<"$pending")"
  [[ -n $versions ]] || die "$KEY_NAME has no ENABLED version"
  SIGNING_VERSION=$(head -n 1 <<<"$versions")
  TRUSTED_VERSIONS=$(paste -sd, - <<<"$versions")
fi

# --- 7. Audiences: the URLs an ID token for a function may be minted for, all known before the
# first deploy so that no deploy opens a window of 401s. Each gen2 function answers at
#   https://REGION-PROJECT.cloudfunctions.net/NAME        (Cloud Functions)
#   https://NAME-PROJECT_NUMBER.REGION.run.app            (Cloud Run's deterministic URL)
# and at its serviceConfig.uri, which may be a hash-based run.app URL known only once it exists.
# The service compares `aud` exactly, so each URL is accepted without and with a trailing "/".
project_number=$(run gcloud projects describe "$PROJECT" --format='value(projectNumber)')
if ((DRY_RUN)); then
  project_number=PROJECT_NUMBER
  note "dry run: PROJECT_NUMBER is a placeholder for the number of $PROJECT"
fi
[[ $project_number =~ ^([0-9]+|PROJECT_NUMBER)$ ]] || die "no project number for $PROJECT: '$project_number'"

service_uris=() # serviceConfig.uri of ENTRIES[i], when that function exists
lookup_service_uris() {
  local i url
  for i in "${!ENTRIES[@]}"; do
    url=$(function_url "${ENTRIES[$i]}")
    if ((DRY_RUN)) && [[ $1 == after ]]; then url="https://$(function_name "${ENTRIES[$i]}")-PLACEHOLDER.$REGION.run.app"; fi
    service_uris[i]=$url
  done
}
# Every function's URLs, each without and with a trailing "/", comma-separated, duplicates once.
audiences() {
  local i name base url out=","
  for i in "${!ENTRIES[@]}"; do
    name=$(function_name "${ENTRIES[$i]}")
    for base in "https://$REGION-$PROJECT.cloudfunctions.net/$name" "https://$name-$project_number.$REGION.run.app" \
      "${service_uris[$i]%/}"; do
      [[ -n $base ]] || continue
      for url in "$base" "$base/"; do
        [[ $out == *",$url,"* ]] || out+="$url,"
      done
    done
  done
  out=${out#,}
  printf '%s' "${out%,}"
}
lookup_service_uris before
DEPLOY_AUDIENCES=$(audiences)

# --- 8. The eight functions, verifiers first and the signer last (DEPLOY_ORDER).
# No --allow-unauthenticated: it binds allUsers as invoker, which the domain-restricted-sharing
# organisation policy forbids. Instead each function's Cloud Run service skips the invoker IAM
# check (--no-invoker-iam-check): every function verifies its caller itself (a Google ID token for
# one of GBX_AUDIENCES, or the admin token), so that 401/403 come with the contract's JSON bodies,
# and public_keys is public by design. A redeploy replaces the service's environment, so the
# audiences ride along with every deploy.
env_vars="^;^GOOGLE_CLOUD_PROJECT=$PROJECT;GBX_ISSUER=$PROJECT"
env_vars+=";GBX_KMS_KEY_VERSION=$SIGNING_VERSION;GBX_TRUSTED_KEY_VERSIONS=$TRUSTED_VERSIONS"
if [[ -n $OPERATORS ]]; then env_vars+=";GBX_OPERATORS=$OPERATORS"; fi
env_vars+=";GBX_AUDIENCES=$DEPLOY_AUDIENCES"

for entry in "${DEPLOY_ORDER[@]}"; do
  name=$(function_name "$entry")
  deploy=(gcloud functions deploy "$name" --gen2 --runtime=python312 --trigger-http
    --entry-point="$entry" --source="$BUILD_DIR/functions/$entry"
    --region="$REGION" --project="$PROJECT" --service-account="$SA_EMAIL"
    --build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SA_EMAIL" --set-env-vars="$env_vars")
  if [[ $entry == issue ]]; then
    deploy+=(--set-secrets="GBX_ADMIN_TOKEN=$SECRET:latest") # the only function that sees the token
  fi
  run "${deploy[@]}"
  # A gen2 function is a Cloud Run service of the same name.
  run gcloud run services update "$name" --region="$REGION" --project="$PROJECT" --no-invoker-iam-check
done

# --- 9. Audiences, again: only when a function's serviceConfig.uri was not known before step 8
# (a first deployment). Updating the environment makes a new revision without a rebuild; step 8
# carries the value on every later redeploy.
lookup_service_uris after
for i in "${!ENTRIES[@]}"; do
  [[ -n ${service_uris[$i]} ]] || die "no URL for $(function_name "${ENTRIES[$i]}")"
done
AUDIENCES=$(audiences)
if [[ $AUDIENCES == "$DEPLOY_AUDIENCES" ]]; then
  note "GBX_AUDIENCES unchanged; already set by the deploys"
else
  for entry in "${DEPLOY_ORDER[@]}"; do
    run gcloud run services update "$(function_name "$entry")" --region="$REGION" --project="$PROJECT" \
      --update-env-vars="^;^GBX_AUDIENCES=$AUDIENCES"
  done
fi

# --- 10. Firestore security rules, last, because they may fail for reasons of their own: the
# functions reach Firestore with IAM credentials, which rules do not govern, so everything above
# works without them. The rules deny every client (mobile/web SDK, REST with end-user tokens) on
# every path. gcloud cannot release rules; the Firebase CLI can, on a project with Firebase added
# (firebase projects:addfirebase PROJECT) and with credentials (firebase login, or
# GOOGLE_APPLICATION_CREDENTIALS). A failure is a warning, not an abort.
rules_command=(firebase deploy --only firestore:rules --project "$PROJECT" --non-interactive)
rules_deployed=1
if ((!DRY_RUN)) && ! command -v firebase >/dev/null 2>&1; then
  rules_deployed=0
  warn "firebase CLI not found"
elif ! run "${rules_command[@]}"; then
  rules_deployed=0
  warn "firebase deploy failed (is Firebase added to $PROJECT, and is the CLI logged in?)"
fi
if ((!rules_deployed)); then
  warn "firestore.rules was NOT deployed; everything else was. Deploy the rules from $ROOT with:"
  warn "  $(quote "${rules_command[@]}")"
fi

echo
if ((DRY_RUN)); then echo "Function URLs (placeholders; a dry run deploys nothing):"; else echo "Function URLs:"; fi
for i in "${!ENTRIES[@]}"; do
  printf '  %-22s %s\n' "$(function_name "${ENTRIES[$i]}")" "${service_uris[$i]}"
done
echo "Each also answers at https://$REGION-$PROJECT.cloudfunctions.net/NAME and https://NAME-$project_number.$REGION.run.app;"
echo "an ID token for any of these URLs is accepted (GBX_AUDIENCES)."
echo "Admin token: gcloud secrets versions access latest --secret=$SECRET --project=$PROJECT"
