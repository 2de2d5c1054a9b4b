#!/usr/bin/env bash
# Deploy GBX Entitlements to a Google Cloud project: APIs, runtime and build service accounts,
# Firestore, Cloud KMS seal key, admin-token secret, one Cloud Function (gen2) per endpoint of the
# registry (shared/endpoints.py), their audiences, Firebase Hosting in front of them (the base URL
# https://SITE.web.app) and, last, the Firestore security rules. The database is protected (point-in-time
# recovery, delete protection, a daily backup schedule); an hourly Cloud Scheduler job runs the ledger
# audit as its own service account; a log-based metric counts ledger mismatches; alert policies watch it and
# the 5xx rate, notifying --alert-email.
#
#   ./deploy.sh --project PROJECT --region REGION [--site SITE] [--partners EMAILS] [--alert-email EMAIL] [--backup-retention DAYS] [--dry-run]
#   ./deploy.sh partner-events EMAIL --project PROJECT [--push-endpoint URL] [--dry-run]
#
# The partners' events: a Pub/Sub topic (gbx-events) the functions alone may publish to, and the sweeper function
# (events_sweep) that Cloud Scheduler calls every minute. `partner-events EMAIL` gives one partner its subscription,
# filtered on its events (attributes.ce-partner), pull or push (an OIDC token of gbx-events-push), and subscriber
# rights on that subscription alone.
#
# Safe to re-run: every create is guarded by a describe, every grant is an idempotent
# add-iam-policy-binding, every deploy replaces the previous revision.
# --dry-run prints each command it would run ("+ ..." lines, shell-quoted, in order) and runs none:
# no gcloud, firebase, openssl or network call. Staging build/ (the functions, the Hosting config and
# its public folder) is local and happens in both modes, so CI can inspect what would be uploaded.
#
# Environment:
#   GBX_OPERATORS           comma-separated operator emails handed to the functions (may be empty)
#   GBX_PARTNERS            comma-separated partner emails, when --partners is not given (may be empty)
#   GBX_BUILD_DIR           where functions and Hosting are staged (default: build, next to this script)
#   GBX_FIRESTORE_LOCATION  Firestore location for a new database (default: REGION; e.g. eur3, nam5)
#   GBX_FIRESTORE_DATABASE  the Firestore database the functions use (default: (default)); a restored database
#                           is put in service by deploying with its name (see the restore drill)
#   GBX_PYTHON              a Python with requirements.txt installed, to read the endpoint registry
#                           (default: .venv/bin/python next to this script, from `make install`; else python3)
#   GBX_CONCURRENCY         requests one instance serves at once (default 40; 1 to 1000)
#   GBX_MIN_INSTANCES       instances each function keeps warm (default 0; a warm instance is billed while idle)
#   GBX_CPU_BOOST           1: startup CPU boost on (the extra CPU is billed), 0: off, unset: left as it is
#   GBX_EXTRA_AUDIENCES     comma-separated https:// origins whose ID tokens are accepted too, e.g. a custom
#                           Hosting domain (https://gbx.example.com); runners then mint tokens for that URL
#
# Prerequisites the script does not handle: billing on the project; a deploying identity that may
# enable services, create service accounts, set the project's IAM policy, update Cloud Run
# services (roles/run.admin) and act as gbx-runtime, gbx-build and gbx-audit (roles/iam.serviceAccountUser
# on the three); manage backups, Cloud Scheduler jobs, log-based metrics and alert policies (Owner has all). Hosting and the Firestore rules additionally need Firebase added to the project and a
# Firebase CLI that is logged in (firebase login, or GOOGLE_APPLICATION_CREDENTIALS); without them
# the script warns, prints the commands to run later, and carries on.
set -euo pipefail

readonly APIS=(
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
  artifactregistry.googleapis.com firestore.googleapis.com cloudkms.googleapis.com
  secretmanager.googleapis.com iam.googleapis.com logging.googleapis.com
  firebaserules.googleapis.com firebasehosting.googleapis.com
  cloudscheduler.googleapis.com monitoring.googleapis.com pubsub.googleapis.com
)
readonly SA_NAME=gbx-runtime
# Builds run as gbx-build: since mid-2024 new projects build with the default compute service
# account, which organisations often strip of the Editor role the build relied on.
readonly BUILD_SA_NAME=gbx-build
readonly BUILD_ROLES=(roles/logging.logWriter roles/artifactregistry.writer roles/storage.objectAdmin)
# Cloud Scheduler calls the internal functions (the ledger audit) with an OIDC token of gbx-audit, the only
# identity given roles/run.invoker on them. It needs no other role.
readonly AUDIT_SA_NAME=gbx-audit
# Each internal function's Cloud Scheduler schedule comes from the registry: the audit hourly, the seal log's catch-up
# integrator (gbx-log-integrate) and the events sweeper every minute.
# run_complete integrates its seal's log entry after answering: its service keeps CPU between requests for that.
readonly LOG_WRITER_FUNCTION=gbx-run-complete
# The partners' events topic; push subscriptions sign their OIDC tokens as gbx-events-push.
readonly EVENTS_TOPIC=gbx-events
readonly PUSH_SA_NAME=gbx-events-push
# The log-based metric counting the audit's mismatch lines, and the alert policies' display names (found by them).
readonly MISMATCH_METRIC=gbx-ledger-mismatches
readonly MISMATCH_POLICY='GBX ledger mismatch'
readonly ERRORS_POLICY='GBX 5xx rate'
readonly KEY_RING=gbx
readonly KEY=seal
# The seal log's checkpoint key: Ed25519, its own key (never the seal key); the functions sign with its version 1.
readonly LOG_KEY=seal-log
readonly SECRET=gbx-admin-token
DATABASE=${GBX_FIRESTORE_DATABASE:-(default)}
# Request concurrency: a request spends most of its time waiting on Firestore or KMS, so one instance
# serves many at once (one process with as many threads; the code is thread-safe). Cloud Run allows
# more than one request per instance only with a whole CPU, and --cpu needs --memory beside it. The
# default of 40 is half Cloud Run's own: the CPU-bound parts (token and seal signature checks, XML and
# JSON parsing, validation) share one CPU and one interpreter lock, and 40 seal uploads of up to
# 256 KiB each fit easily in 512 MiB.
readonly CPU=1
readonly MEMORY=512Mi

usage() {
  cat <<'EOF'
usage: deploy.sh --project PROJECT --region REGION [--site SITE] [--dry-run]
                 [--partners EMAILS] [--alert-email EMAIL] [--backup-retention DAYS]
       deploy.sh partner-events EMAIL --project PROJECT [--push-endpoint URL] [--dry-run]

  --project PROJECT         Google Cloud project to deploy into
  --region REGION           region of the functions and the KMS key ring (e.g. europe-west1)
  --site SITE               Firebase Hosting site of the base URL https://SITE.web.app (default: PROJECT)
  --partners EMAILS         comma-separated Google identities of the partners (GBX_PARTNERS): each issues, revokes,
                            reads and exports its own grants with its ID token; the list replaces the deployed one
                            (default: GBX_PARTNERS from the environment; empty: only the admin token issues)
  --alert-email EMAIL       notify this address when the ledger audit finds a mismatch or 5xx answers climb
                            (default: the alert policies are created without a notification channel)
  --backup-retention DAYS   keep each daily Firestore backup this many days, 1 to 98 (default 14)
  --dry-run                 print every command that would run (prefixed "+ "), run none

  partner-events EMAIL      give the partner EMAIL its subscription to its own events (gbx-events-EMAIL with ~ for @),
                            filtered on attributes.ce-partner, with subscriber rights on it alone (after a deployment)
  --push-endpoint URL       push the events to this https:// URL with an OIDC token (default: a pull subscription)
EOF
}

bad_usage() {
  printf 'deploy.sh: %s\n' "$1" >&2
  usage >&2
  exit 2
}

PROJECT=""
REGION=""
SITE=""
PARTNERS=${GBX_PARTNERS:-}
DRY_RUN=0
ALERT_EMAIL=""
BACKUP_RETENTION=14
MODE=deploy
PARTNER=""
PUSH_ENDPOINT=""
if [[ ${1:-} == partner-events ]]; then
  MODE=partner-events
  (($# >= 2)) || bad_usage "partner-events needs the partner's EMAIL"
  PARTNER=$2
  shift 2
fi
while (($#)); do
  case "$1" in
    --push-endpoint)
      (($# >= 2)) || bad_usage "$1 needs a value"
      PUSH_ENDPOINT=$2
      shift 2
      ;;
    --push-endpoint=*) PUSH_ENDPOINT=${1#*=}; shift ;;
    --project | --region | --site | --partners | --alert-email | --backup-retention)
      (($# >= 2)) || bad_usage "$1 needs a value"
      case $1 in
        --project) PROJECT=$2 ;; --region) REGION=$2 ;; --site) SITE=$2 ;; --partners) PARTNERS=$2 ;;
        --alert-email) ALERT_EMAIL=$2 ;; *) BACKUP_RETENTION=$2 ;;
      esac
      shift 2
      ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --region=*) REGION=${1#*=}; shift ;;
    --site=*) SITE=${1#*=}; shift ;;
    --partners=*) PARTNERS=${1#*=}; shift ;;
    --alert-email=*) ALERT_EMAIL=${1#*=}; shift ;;
    --backup-retention=*) BACKUP_RETENTION=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown argument: $1" ;;
  esac
done
[[ -n $PROJECT ]] || bad_usage "--project is required"
if [[ $MODE == partner-events ]]; then
  # Subscription ids allow letters, digits and - _ . ~ + %: an email is one with ~ for @.
  [[ $PARTNER =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$ ]] || bad_usage "not an email address: $PARTNER"
  PARTNER=${PARTNER,,}
  [[ -z $PUSH_ENDPOINT || $PUSH_ENDPOINT =~ ^https://[^[:space:]\"\'\;,]+$ ]] || bad_usage "--push-endpoint must be an https:// URL"
  REGION=${REGION:-unused-region1}
else
  [[ -z $PUSH_ENDPOINT ]] || bad_usage "--push-endpoint goes with partner-events"
fi
[[ -n $REGION ]] || bad_usage "--region is required"
# All of these end up inside resource names, URLs and gcloud dict flags: refuse anything unusual.
# Project IDs: letters, digits and hyphens only, so legacy domain-scoped IDs (example.com:name) are
# refused (their service-account emails and cloudfunctions.net host names have another shape). Length
# is left to gcloud (real IDs have 6 to 30 characters), so the documented `--project demo` dry run works.
[[ $PROJECT =~ ^[a-z][a-z0-9-]{0,28}[a-z0-9]$ ]] || bad_usage "not a Google Cloud project ID: $PROJECT"
[[ $REGION =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || bad_usage "not a Google Cloud region: $REGION"
# A project's default Hosting site is named after the project; some older projects' is not (see the
# Hosting page of the Firebase console), hence --site. A site ID is one DNS label.
SITE=${SITE:-$PROJECT}
[[ $SITE =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] || bad_usage "not a Firebase Hosting site ID: $SITE"
OPERATORS=${GBX_OPERATORS:-}
[[ $OPERATORS != *";"* ]] || bad_usage "GBX_OPERATORS must not contain ';'"
# Partners: emails, comma-separated (they end up in a gcloud dict flag, so nothing else).
for partner in ${PARTNERS//,/ }; do
  [[ $partner =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$ ]] || bad_usage "--partners: not an email address: $partner"
done
FIRESTORE_LOCATION=${GBX_FIRESTORE_LOCATION:-$REGION}
# Firestore keeps a daily backup at most 14 weeks.
[[ $BACKUP_RETENTION =~ ^[1-9][0-9]?$ ]] && ((BACKUP_RETENTION <= 98)) || bad_usage "--backup-retention must be 1 to 98 days"
[[ -z $ALERT_EMAIL || $ALERT_EMAIL =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$ ]] || bad_usage "not an email address: $ALERT_EMAIL"
# A database ID: (default), or 4 to 63 of [a-z0-9-], a letter first, no hyphen last.
[[ $DATABASE == '(default)' || $DATABASE =~ ^[a-z][a-z0-9-]{2,61}[a-z0-9]$ ]] || bad_usage "GBX_FIRESTORE_DATABASE is not a Firestore database ID: $DATABASE"
CONCURRENCY=${GBX_CONCURRENCY:-40}
[[ $CONCURRENCY =~ ^[1-9][0-9]{0,3}$ ]] && ((CONCURRENCY <= 1000)) || bad_usage "GBX_CONCURRENCY must be 1 to 1000"
MIN_INSTANCES=${GBX_MIN_INSTANCES:-0}
[[ $MIN_INSTANCES =~ ^(0|[1-9][0-9]{0,2})$ ]] || bad_usage "GBX_MIN_INSTANCES must be a number of instances"
CPU_BOOST=${GBX_CPU_BOOST:-}
[[ $CPU_BOOST =~ ^[01]?$ ]] || bad_usage "GBX_CPU_BOOST must be 1, 0 or unset"
EXTRA_AUDIENCES=()
IFS=, read -r -a extra_audiences <<<"${GBX_EXTRA_AUDIENCES:-}"
for url in ${extra_audiences[@]+"${extra_audiences[@]}"}; do
  url=${url//[[:space:]]/}
  url=${url%/}
  [[ -n $url ]] || continue
  # An origin only: it rides in the functions' environment (';' and ',' delimit there) and is compared exactly.
  [[ $url =~ ^https://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?$ ]] ||
    bad_usage "GBX_EXTRA_AUDIENCES: not an https:// origin (https://host[:port]): $url"
  EXTRA_AUDIENCES+=("$url")
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_DIR=${GBX_BUILD_DIR:-build}
if [[ -n ${GBX_BUILD_DIR:-} && $BUILD_DIR != /* ]]; then
  BUILD_DIR="$PWD/$BUILD_DIR" # relative to where the operator stands, not to the checkout
fi
cd "$ROOT" # firebase reads firebase.json from the working directory; the default build dir is here
# A Python with the project's requirements: the endpoint registry imports pydantic and the models.
if [[ -n ${GBX_PYTHON:-} ]]; then
  PYTHON=$GBX_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
  PYTHON=$ROOT/.venv/bin/python
else
  PYTHON=python3
fi

SA_EMAIL="$SA_NAME@$PROJECT.iam.gserviceaccount.com"
BUILD_SA_EMAIL="$BUILD_SA_NAME@$PROJECT.iam.gserviceaccount.com"
AUDIT_SA_EMAIL="$AUDIT_SA_NAME@$PROJECT.iam.gserviceaccount.com"
KEY_NAME="projects/$PROJECT/locations/$REGION/keyRings/$KEY_RING/cryptoKeys/$KEY"
LOG_KEY_VERSION="projects/$PROJECT/locations/$REGION/keyRings/$KEY_RING/cryptoKeys/$LOG_KEY/cryptoKeyVersions/1"
export CLOUDSDK_CORE_DISABLE_PROMPTS=1 # a prompt would hang CI; every answer is in the flags

# fd 3 is the operator's stdout, so commands are shown even from inside $(...).
exec 3>&1

# Shell-quote the arguments into $quoted, without a subshell (a dry run shows a hundred commands).
quote() {
  local arg
  quoted=""
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      quoted+=" $arg"
    else
      quoted+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  quoted=${quoted# }
}
quoted() { quote "$@"; printf '%s' "$quoted"; }

show() { quote "$@"; printf '+ %s\n' "$quoted" >&3; }
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

# The serviceConfig.uri of function i (of ENTRIES and NAMES), or nothing when it does not exist.
function_url() {
  probe gcloud functions describe "${NAMES[$1]}" --gen2 --region="$REGION" --project="$PROJECT" \
    --format='value(serviceConfig.uri)'
}

# --- partner-events EMAIL: one partner's subscription to its own events, and nothing else. The topic exists once the
# service is deployed. A filter cannot be changed after creation: an existing subscription keeps its own (the same).
if [[ $MODE == partner-events ]]; then
  subscription="$EVENTS_TOPIC-${PARTNER/@/\~}"
  if [[ $PARTNER == *.gserviceaccount.com ]]; then member="serviceAccount:$PARTNER"; else member="user:$PARTNER"; fi
  push_flags=()
  if [[ -n $PUSH_ENDPOINT ]]; then
    # Pub/Sub signs each push with an OIDC token of gbx-events-push for the endpoint's URL; the partner checks it.
    push_sa="$PUSH_SA_NAME@$PROJECT.iam.gserviceaccount.com"
    found=$(probe gcloud iam service-accounts describe "$push_sa" --project="$PROJECT" --format='value(email)')
    if [[ -z $found ]]; then
      run gcloud iam service-accounts create "$PUSH_SA_NAME" --project="$PROJECT" --display-name="GBX events push (OIDC tokens of push subscriptions)"
    fi
    number=$(run gcloud projects describe "$PROJECT" --format='value(projectNumber)')
    ((DRY_RUN)) && number=PROJECT_NUMBER
    # Projects made before April 2021 need Pub/Sub's service agent to be a token creator on the push account.
    retry run gcloud iam service-accounts add-iam-policy-binding "$push_sa" --project="$PROJECT" \
      --member="serviceAccount:service-$number@gcp-sa-pubsub.iam.gserviceaccount.com" --role=roles/iam.serviceAccountTokenCreator \
      --condition=None --format=none
    push_flags=(--push-endpoint="$PUSH_ENDPOINT" --push-auth-service-account="$push_sa" --push-auth-token-audience="$PUSH_ENDPOINT")
  fi
  found=$(probe gcloud pubsub subscriptions describe "$subscription" --project="$PROJECT" --format='value(name)')
  if [[ -z $found ]]; then
    run gcloud pubsub subscriptions create "$subscription" --project="$PROJECT" --topic="$EVENTS_TOPIC" \
      --message-filter="attributes.ce-partner = \"$PARTNER\"" --enable-message-ordering --ack-deadline=60 \
      --message-retention-duration=7d ${push_flags[@]+"${push_flags[@]}"}
  elif ((${#push_flags[@]})); then
    run gcloud pubsub subscriptions modify-push-config "$subscription" --project="$PROJECT" "${push_flags[@]}"
  fi
  retry run gcloud pubsub subscriptions add-iam-policy-binding "$subscription" --project="$PROJECT" \
    --member="$member" --role=roles/pubsub.subscriber --format=none
  echo
  echo "Subscription projects/$PROJECT/subscriptions/$subscription: the events of $PARTNER only (attributes.ce-partner)."
  if [[ -z $PUSH_ENDPOINT ]]; then echo "  $PARTNER pulls them (roles/pubsub.subscriber on it alone); see docs/operations.md."; fi
  exit 0
fi

# --- 1. The endpoint registry (shared/endpoints.py) declares every function once. One interpreter
# (importing the registry takes a moment) reads it and stages Hosting from it:
#  - it prints `python -m shared.endpoints list`: NAME FUNCTION_NAME METHOD PATH CALLER KEYS, one line
#    per function, in deploy order. After a key rotation every function gets the new signing version,
#    but only run_complete signs: the functions that verify seals or publish the keys come first, so
#    the new version is trusted everywhere before the first seal is signed with it; the signer is last;
#  - it writes $BUILD_DIR/firebase.json, the config `firebase deploy --only hosting` is given: the
#    tracked firebase.json (public folder, headers, Firestore files) with the site and, for REGION,
#    the registry's rewrites (`python -m shared.endpoints rewrites`) of every path to its function.
#    Firebase resolves the paths in a config from that config's folder and refuses any outside it, so
#    the public folder ($BUILD_DIR/hosting: the portal plus a copy of openapi.json, served at
#    /openapi.json, and gbx/, the runner client's wheel with its index and sha256, built reproducibly
#    by shared/client_wheel.py) and the Firestore rules and indexes are copied next to it.
registry_status=0
# The registry imports shared/ and the runner client's package (client/gbx_client), both from this checkout.
registry=$(PYTHONPATH="$ROOT:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$REGION" "$SITE" "$BUILD_DIR" <<'PY'
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

try:
    from shared import client_wheel, endpoints
except ImportError as exc:
    sys.exit(f"deploy.sh: {exc}")

region, site, build = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rewrites = io.StringIO()
with contextlib.redirect_stdout(rewrites):
    endpoints.main(["rewrites", "--region", region])
config = json.loads(Path("firebase.json").read_text(encoding="utf-8"))
public, staged_public = Path(config["hosting"]["public"]), build / "hosting"
if not (public / "index.html").is_file():
    sys.exit(f"deploy.sh: error: {public}/index.html is missing")
build.mkdir(parents=True, exist_ok=True)
shutil.rmtree(staged_public, ignore_errors=True)
shutil.copytree(public, staged_public, ignore=shutil.ignore_patterns(".*", "__pycache__"))
shutil.copyfile("openapi.json", staged_public / "openapi.json")
try:
    client_wheel.build(staged_public / "gbx", base_url=f"https://{site}.web.app")
except client_wheel.WheelBuildFailed as exc:
    sys.exit(f"deploy.sh: error: {exc}")
for key in ("rules", "indexes"):
    source = Path(config["firestore"][key])
    shutil.copyfile(source, build / source.name)
    config["firestore"][key] = source.name
# The tracked rewrites (the portal's own paths, such as /v of the verification links) first, then the registry's.
config["hosting"] = {
    "site": site, **config["hosting"], "public": staged_public.name,
    "rewrites": config["hosting"].get("rewrites", []) + json.loads(rewrites.getvalue()),
}
(build / "firebase.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
endpoints.main(["list"])
PY
) || registry_status=$?
if ((registry_status)); then
  if ! PYTHONPATH="$ROOT:$ROOT/client" "$PYTHON" -c 'import shared.endpoints' >/dev/null 2>&1; then
    die "cannot import shared.endpoints with $PYTHON: run make install first (or set GBX_PYTHON to a Python with requirements.txt installed)"
  fi
  die "reading the endpoint registry and staging Hosting failed (see above)"
fi
[[ -n $registry ]] || die "the endpoint registry lists no function"
# Per function, in deploy order: its entry point (functions/<entry>/main.py), its name, who calls it, its
# timeout, and whether it is internal (invoked only by gbx-audit through Cloud Run's IAM check, from Cloud
# Scheduler) or public (every caller checked by the function itself).
ENTRIES=() NAMES=() CALLERS=() TIMEOUTS=() ACCESS=() SCHEDULES=()
while IFS=$'\t' read -r entry name _method _path caller _keys timeout access schedule; do
  [[ $entry =~ ^[a-z][a-z0-9_]*$ && $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ && $timeout =~ ^[1-9][0-9]{0,3}$ &&
    $access =~ ^(public|internal)$ && $schedule =~ ^[0-9*/,-]+( [0-9*/,-]+){4}$ ]] || die "unexpected line from the endpoint registry: $entry $name"
  SCHEDULES+=("$schedule")
  ENTRIES+=("$entry")
  NAMES+=("$name")
  CALLERS+=("$caller")
  TIMEOUTS+=("$timeout")
  ACCESS+=("$access")
done <<<"$registry"
note "staged Hosting: $BUILD_DIR/firebase.json, public folder $BUILD_DIR/hosting (portal/ + openapi.json + gbx/)"

# Then each function: its main.py and requirements.txt beside the library every function shares: shared/
# (minus the local-mode modules) and gbx_client/, the runner client's package, where the seal format lives
# once for both. The library is prepared once, then copied whole into each function.
for entry in "${ENTRIES[@]}"; do
  [[ -f functions/$entry/main.py ]] || die "functions/$entry/main.py is missing"
done
library="$BUILD_DIR/functions/.library"
rm -rf -- "$library"
mkdir -p -- "$library"
cp -R -- shared client/gbx_client "$library/"
find "$library" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf -- {} +
# local.py serves everything on one port with local keys; emulator.py and pubsub_emulator.py start the emulators.
rm -f -- "$library/shared/local.py" "$library/shared/emulator.py" "$library/shared/pubsub_emulator.py"
stage() {
  local entry=$1
  local source="functions/$entry/main.py" dest="$BUILD_DIR/functions/$entry"
  rm -rf -- "$dest"
  cp -R -- "$library" "$dest"
  cp -- "$source" requirements.txt "$dest/"
  note "staged $source -> $dest"
}
for entry in "${ENTRIES[@]}"; do stage "$entry"; done
rm -rf -- "$library"

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
# Cloud Scheduler's identity for the internal functions: invoker on them only (step 8), nothing on the project.
ensure_service_account "$AUDIT_SA_NAME" "GBX Entitlements ledger audit (Cloud Scheduler)"

# --- 3b. The partners' events topic: the functions (gbx-runtime) may publish to it, and to nothing else in Pub/Sub.
# Partners get subscriptions on it with `deploy.sh partner-events EMAIL`.
topic_found=$(probe gcloud pubsub topics describe "$EVENTS_TOPIC" --project="$PROJECT" --format='value(name)')
if [[ -z $topic_found ]]; then
  run gcloud pubsub topics create "$EVENTS_TOPIC" --project="$PROJECT"
fi
retry run gcloud pubsub topics add-iam-policy-binding "$EVENTS_TOPIC" --project="$PROJECT" \
  --member="serviceAccount:$SA_EMAIL" --role=roles/pubsub.publisher --format=none

# --- 4. Firestore (native mode) and its indexes (its rules are the last step).
db_type=$(probe gcloud firestore databases describe --database="$DATABASE" --project="$PROJECT" --format='value(type)')
if [[ -z $db_type ]]; then
  run gcloud firestore databases create --database="$DATABASE" --location="$FIRESTORE_LOCATION" \
    --type=firestore-native --project="$PROJECT"
elif [[ $db_type != FIRESTORE_NATIVE ]]; then
  die "the $DATABASE Firestore database of $PROJECT is $db_type; GBX needs Firestore in native mode"
fi
# What Firestore holds is money: point-in-time recovery (any minute of the last 7 days can be read or exported)
# and delete protection (the database cannot be deleted until it is switched off). Idempotent, so also on
# a database that existed before.
run gcloud firestore databases update --database="$DATABASE" --enable-pitr --delete-protection --project="$PROJECT"
# One daily backup schedule, kept --backup-retention days (Firestore allows up to 14 weeks). A daily schedule
# is found by its missing weekly day; an existing one gets the retention asked for.
retention_seconds=$((BACKUP_RETENTION * 86400))s
daily_schedule=$(probe gcloud firestore backups schedules list --database="$DATABASE" --project="$PROJECT" \
  --format='value(name.basename(),retention,weeklyRecurrence.day)' | awk -F'\t' '$3 == "" { print $1 "\t" $2; exit }')
if [[ -z $daily_schedule ]]; then
  run gcloud firestore backups schedules create --database="$DATABASE" --recurrence=daily \
    --retention="${BACKUP_RETENTION}d" --project="$PROJECT"
elif [[ ${daily_schedule#*$'\t'} != "$retention_seconds" ]]; then
  run gcloud firestore backups schedules update --backup-schedule="${daily_schedule%%$'\t'*}" --database="$DATABASE" \
    --retention="${BACKUP_RETENTION}d" --project="$PROJECT"
fi

# One line of gcloud flags per index of firestore.indexes.json (the firebase-tools format).
index_lines=$("$PYTHON" - firestore.indexes.json <<'PY'
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
  show gcloud firestore indexes composite create "$@" --database="$DATABASE" --project="$PROJECT"
  if ((DRY_RUN)); then return 0; fi
  # There is no describe for "this exact index": create it and accept ALREADY_EXISTS (HTTP 409).
  # Not --async: creating indexes on one collection concurrently can fail with a 409 as well.
  if ! err=$(gcloud firestore indexes composite create "$@" --database="$DATABASE" --project="$PROJECT" 2>&1 >/dev/null); then
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
# Published partner events expire 30 days after their publication (shared/events.py writes expire_at when it marks
# them published; an unpublished event has none and stays until the sweeper publishes it). Enabling a TTL that is
# on already changes nothing; --async: the policy takes minutes to become active and nothing here waits on it.
run gcloud firestore fields ttls update expire_at --collection-group=events --enable-ttl --async \
  --database="$DATABASE" --project="$PROJECT"

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
  printf '+ %s | %s | %s\n' "$(quoted openssl rand -hex 32)" "$(quoted tr -d '\n')" \
    "$(quoted gcloud secrets versions add "$SECRET" --data-file=- --project="$PROJECT")" >&3
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

# --- 6b. The seal log's key: EC_SIGN_ED25519, signing checkpoints only (C2SP signed-note, type 0x01). A log's key is
# its identity (the vkey monitors keep), so it is not rotated like the seal key: the functions sign with version 1.
# Until that version is generated, checkpoints wait (503 to the signer) and the seals' entries with them.
log_key_algorithm=$(probe gcloud kms keys describe "$LOG_KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
  --format='value(versionTemplate.algorithm)')
if [[ -z $log_key_algorithm ]]; then
  run gcloud kms keys create "$LOG_KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
    --purpose=asymmetric-signing --default-algorithm=ec-sign-ed25519
elif [[ $log_key_algorithm != EC_SIGN_ED25519 ]]; then
  die "$LOG_KEY exists with algorithm $log_key_algorithm; the seal log needs EC_SIGN_ED25519"
fi
retry run gcloud kms keys add-iam-policy-binding "$LOG_KEY" --keyring="$KEY_RING" --location="$REGION" --project="$PROJECT" \
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
# first deploy so that no deploy opens a window of 401s. First the base URL, where Firebase Hosting
# answers every path (https://SITE.web.app and https://SITE.firebaseapp.com, and the custom domains of
# GBX_EXTRA_AUDIENCES): one token minted for it is accepted by every function. Then each gen2 function's own URLs:
#   https://REGION-PROJECT.cloudfunctions.net/NAME        (Cloud Functions)
#   https://NAME-PROJECT_NUMBER.REGION.run.app            (Cloud Run's deterministic URL)
# and its serviceConfig.uri, which may be a hash-based run.app URL known only once it exists.
# The service compares `aud` exactly, so each URL is accepted without and with a trailing "/".
readonly BASE_URL="https://$SITE.web.app"
readonly BASE_URLS=("$BASE_URL" "https://$SITE.firebaseapp.com" ${EXTRA_AUDIENCES[@]+"${EXTRA_AUDIENCES[@]}"})
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
    url=$(function_url "$i")
    if ((DRY_RUN)) && [[ $1 == after ]]; then url="https://${NAMES[$i]}-PLACEHOLDER.$REGION.run.app"; fi
    service_uris[i]=$url
  done
}
# The base URLs, then every function's URLs, each without and with a trailing "/", comma-separated,
# duplicates once.
audiences() {
  local i name base url out=","
  for base in "${BASE_URLS[@]}"; do out+="$base,$base/,"; done
  for i in "${!ENTRIES[@]}"; do
    name=${NAMES[$i]}
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

# --- 8. The functions, in the registry's deploy order (verifiers first, the signer last).
# No --allow-unauthenticated: it binds allUsers as invoker, which the domain-restricted-sharing
# organisation policy forbids. Instead each function's Cloud Run service skips the invoker IAM
# check (--no-invoker-iam-check): every function verifies its caller itself (a Google ID token for
# one of GBX_AUDIENCES, or the admin token), so that 401/403 come with the contract's JSON bodies,
# and public_keys is public by design. Firebase Hosting reaches the services the same way. A
# redeploy replaces the service's environment, so the audiences ride along with every deploy.
# Concurrency: see CPU and MEMORY above. THREADS is the functions framework's thread count (its
# default, 4 per CPU, would leave most of the concurrency waiting in a queue). --min-instances is
# always given, so the environment decides it and a redeploy without GBX_MIN_INSTANCES goes back to 0.
# GBX_PUBLIC_URL: the base URL that seals' verification links (BASE/v#P.S, the badge's QR code) point at.
env_vars="^;^GOOGLE_CLOUD_PROJECT=$PROJECT;GBX_ISSUER=$PROJECT;GBX_PUBLIC_URL=$BASE_URL"
env_vars+=";GBX_KMS_KEY_VERSION=$SIGNING_VERSION;GBX_TRUSTED_KEY_VERSIONS=$TRUSTED_VERSIONS"
env_vars+=";GBX_LOG_KEY_VERSION=$LOG_KEY_VERSION"
if [[ -n $OPERATORS ]]; then env_vars+=";GBX_OPERATORS=$OPERATORS"; fi
if [[ -n $PARTNERS ]]; then env_vars+=";GBX_PARTNERS=$PARTNERS"; fi
env_vars+=";THREADS=$CONCURRENCY"
env_vars+=";GBX_AUDITORS=$AUDIT_SA_EMAIL"
if [[ $DATABASE != '(default)' ]]; then env_vars+=";GBX_FIRESTORE_DATABASE=$DATABASE"; fi
env_vars+=";GBX_AUDIENCES=$DEPLOY_AUDIENCES"
# Startup CPU boost is a Cloud Run setting; it rides along with the invoker setting after each deploy.
cpu_boost=()
case $CPU_BOOST in 1) cpu_boost=(--cpu-boost) ;; 0) cpu_boost=(--no-cpu-boost) ;; esac

for i in "${!ENTRIES[@]}"; do
  entry=${ENTRIES[$i]} name=${NAMES[$i]}
  deploy=(gcloud functions deploy "$name" --gen2 --runtime=python312 --trigger-http
    --entry-point="$entry" --source="$BUILD_DIR/functions/$entry"
    --region="$REGION" --project="$PROJECT" --service-account="$SA_EMAIL"
    --build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SA_EMAIL"
    --concurrency="$CONCURRENCY" --cpu="$CPU" --memory="$MEMORY" --min-instances="$MIN_INSTANCES"
    --timeout="${TIMEOUTS[$i]}s" --set-env-vars="$env_vars")
  if [[ ${CALLERS[$i]} == partner || ${CALLERS[$i]} == partner_or_operator ]]; then
    deploy+=(--set-secrets="GBX_ADMIN_TOKEN=$SECRET:latest") # only the functions partners call see the token
  fi
  run "${deploy[@]}"
  # A gen2 function is a Cloud Run service of the same name.
  if [[ ${ACCESS[$i]} == internal ]]; then
    # Only gbx-audit (Cloud Scheduler) may invoke it: Cloud Run checks the caller's IAM before the function
    # checks the token again (GBX_AUDITORS). Hosting cannot reach it, so it has no rewrite.
    run gcloud run services update "$name" --region="$REGION" --project="$PROJECT" --invoker-iam-check \
      ${cpu_boost[@]+"${cpu_boost[@]}"}
    retry run gcloud run services add-iam-policy-binding "$name" --region="$REGION" --project="$PROJECT" \
      --member="serviceAccount:$AUDIT_SA_EMAIL" --role=roles/run.invoker --format=none
  elif [[ $name == "$LOG_WRITER_FUNCTION" ]]; then
    # CPU between requests: the seal's log entry is integrated by a thread that runs on after the answer.
    run gcloud run services update "$name" --region="$REGION" --project="$PROJECT" --no-invoker-iam-check \
      --no-cpu-throttling ${cpu_boost[@]+"${cpu_boost[@]}"}
  else
    run gcloud run services update "$name" --region="$REGION" --project="$PROJECT" --no-invoker-iam-check \
      ${cpu_boost[@]+"${cpu_boost[@]}"} # (set -u calls an empty array unbound before bash 4.4)
  fi
done

# --- 9. Audiences, again: only when a function's serviceConfig.uri was not known before step 8
# (a first deployment). Updating the environment makes a new revision without a rebuild; step 8
# carries the value on every later redeploy.
lookup_service_uris after
for i in "${!ENTRIES[@]}"; do
  [[ -n ${service_uris[$i]} ]] || die "no URL for ${NAMES[$i]}"
done
AUDIENCES=$(audiences)
if [[ $AUDIENCES == "$DEPLOY_AUDIENCES" ]]; then
  note "GBX_AUDIENCES unchanged; already set by the deploys"
else
  for name in "${NAMES[@]}"; do
    run gcloud run services update "$name" --region="$REGION" --project="$PROJECT" \
      --update-env-vars="^;^GBX_AUDIENCES=$AUDIENCES"
  done
fi

# --- 9b. Operations: the hourly ledger audit and the events sweeper every minute, a metric counting the audit's
# mismatches, alerts on it and on 5xx answers.
# Each internal function gets a Cloud Scheduler job of its name that POSTs to its cloudfunctions.net URL (known before
# it exists, and one of GBX_AUDIENCES) with an OIDC token of gbx-audit for that URL. The attempt deadline is the
# function's timeout: a pass over many grants goes on in the next call from the cursor the audit keeps.
for i in "${!ENTRIES[@]}"; do
  [[ ${ACCESS[$i]} == internal ]] || continue
  name=${NAMES[$i]}
  url="https://$REGION-$PROJECT.cloudfunctions.net/$name"
  job_flags=(--location="$REGION" --project="$PROJECT" --schedule="${SCHEDULES[$i]}" --time-zone=Etc/UTC
    --uri="$url" --http-method=POST --oidc-service-account-email="$AUDIT_SA_EMAIL" --oidc-token-audience="$url"
    --attempt-deadline="${TIMEOUTS[$i]}s" --description="GBX: $name, cron ${SCHEDULES[$i]} UTC (see docs/operations.md)")
  job_found=$(probe gcloud scheduler jobs describe "$name" --location="$REGION" --project="$PROJECT" --format='value(name)')
  if [[ -z $job_found ]]; then
    run gcloud scheduler jobs create http "$name" "${job_flags[@]}"
  else
    run gcloud scheduler jobs update http "$name" "${job_flags[@]}"
  fi
done

# The audit logs one line per mismatch ({"severity": "ERROR", "event": "ledger_mismatch", ...}): a counter metric.
mismatch_filter='resource.type="cloud_run_revision" AND jsonPayload.event="ledger_mismatch" AND severity>=ERROR'
metric_found=$(probe gcloud logging metrics describe "$MISMATCH_METRIC" --project="$PROJECT" --format='value(name)')
metric_verb=create
[[ -z $metric_found ]] || metric_verb=update
run gcloud logging metrics "$metric_verb" "$MISMATCH_METRIC" --project="$PROJECT" \
  --description="GBX ledger audit: grant documents whose unused runs disagree with their ledger" --log-filter="$mismatch_filter"

# The notification channel of --alert-email (found by its address, or created).
channels=""
if [[ -n $ALERT_EMAIL ]]; then
  channels=$(probe gcloud beta monitoring channels list --project="$PROJECT" \
    --filter="type=\"email\" AND labels.email_address=\"$ALERT_EMAIL\"" --format='value(name)' | head -n 1)
  if [[ -z $channels ]]; then
    channels=$(run gcloud beta monitoring channels create --project="$PROJECT" --type=email \
      --display-name="GBX alerts ($ALERT_EMAIL)" --channel-labels="email_address=$ALERT_EMAIL" --format='value(name)')
  fi
  if ((DRY_RUN)); then
    channels="projects/$PROJECT/notificationChannels/CHANNEL_ID"
    note "dry run: $channels is a placeholder for the channel of $ALERT_EMAIL"
  fi
  [[ $channels =~ ^projects/[^/]+/notificationChannels/[A-Za-z0-9_]+$ ]] || die "no notification channel for $ALERT_EMAIL: '$channels'"
else
  note "no --alert-email: the alert policies open incidents in Cloud Monitoring but notify no one"
fi

# The alert policies, written as JSON files (Cloud Monitoring's AlertPolicy) into the build folder, then created,
# or updated when a policy of the same display name exists.
monitoring_dir="$BUILD_DIR/monitoring"
mkdir -p -- "$monitoring_dir"
"$PYTHON" - "$monitoring_dir" "$MISMATCH_METRIC" "$MISMATCH_POLICY" "$ERRORS_POLICY" "$channels" <<'PY'
import json
import sys
from pathlib import Path

folder, metric, mismatch_name, errors_name, channels = sys.argv[1:]
channels = [channels] if channels else []
rate = {"alignmentPeriod": "300s", "perSeriesAligner": "ALIGN_RATE", "crossSeriesReducer": "REDUCE_SUM"}
requests = 'metric.type="run.googleapis.com/request_count" AND resource.type="cloud_run_revision" AND resource.labels.service_name=starts_with("gbx-")'
policies = {
    "ledger-mismatch.json": {
        "displayName": mismatch_name,
        "combiner": "OR",
        "notificationChannels": channels,
        "documentation": {"mimeType": "text/markdown", "content": "The hourly ledger audit found a grant whose unused runs disagree with its ledger. The ERROR lines with `jsonPayload.event=\"ledger_mismatch\"` name the principal, grant, document, expected and found values. See docs/operations.md, \"Ledger audit\"."},
        "conditions": [{
            "displayName": "ledger mismatches logged",
            "conditionThreshold": {
                "filter": f'metric.type="logging.googleapis.com/user/{metric}" AND resource.type="cloud_run_revision"',
                "aggregations": [{"alignmentPeriod": "300s", "perSeriesAligner": "ALIGN_SUM", "crossSeriesReducer": "REDUCE_SUM"}],
                "comparison": "COMPARISON_GT", "thresholdValue": 0, "duration": "0s", "trigger": {"count": 1},
            },
        }],
        "alertStrategy": {"autoClose": "86400s"},
    },
    "5xx-rate.json": {
        "displayName": errors_name,
        "combiner": "OR",
        "notificationChannels": channels,
        "documentation": {"mimeType": "text/markdown", "content": "More than 1% of the GBX functions' answers were 5xx over 5 minutes. 503s mean Firestore or KMS was unavailable; 500s are bugs, logged with their traceback and request id. See docs/operations.md, \"Alerts\"."},
        "conditions": [{
            "displayName": "5xx answers above 1% for 5 minutes",
            "conditionThreshold": {
                "filter": requests + ' AND metric.labels.response_code_class="5xx"',
                "aggregations": [rate],
                "denominatorFilter": requests,
                "denominatorAggregations": [rate],
                "comparison": "COMPARISON_GT", "thresholdValue": 0.01, "duration": "300s", "trigger": {"count": 1},
            },
        }],
    },
}
for name, policy in policies.items():
    Path(folder, name).write_text(json.dumps(policy, indent=2) + "\n", encoding="utf-8")
PY
for policy in ledger-mismatch:"$MISMATCH_POLICY" 5xx-rate:"$ERRORS_POLICY"; do
  file="$monitoring_dir/${policy%%:*}.json" display_name=${policy#*:}
  policy_found=$(probe gcloud alpha monitoring policies list --project="$PROJECT" \
    --filter="displayName=\"$display_name\"" --format='value(name)' | head -n 1)
  if [[ -z $policy_found ]]; then
    run gcloud alpha monitoring policies create --project="$PROJECT" --policy-from-file="$file"
  else
    run gcloud alpha monitoring policies update "$policy_found" --project="$PROJECT" --policy-from-file="$file"
  fi
done

# --- 10 and 11: Firebase. gcloud can neither deploy Hosting nor release rules; the Firebase CLI can, on a
# project with Firebase added (firebase projects:addfirebase PROJECT) and with credentials (firebase login,
# or GOOGLE_APPLICATION_CREDENTIALS). Both come after the functions and may fail for reasons of their own,
# so a failure is a warning with the commands to run later, not an abort: the functions answer at their
# own URLs either way.
have_firebase=1
if ((!DRY_RUN)) && ! command -v firebase >/dev/null 2>&1; then
  have_firebase=0
  warn "firebase CLI not found (npm install -g firebase-tools, then firebase login)"
fi
firebase_hinted=0
firebase_failed() {
  ((firebase_hinted)) && return 0
  firebase_hinted=1
  warn "firebase failed (is Firebase added to $PROJECT: firebase projects:addfirebase $PROJECT? Is the CLI logged in?)"
}

# --- 10. Firebase Hosting, the base URL: every contract path rewritten to its function (the rewrites name
# Cloud Run services, so they come after the functions), the portal at /, /openapi.json. The site is created
# on a project that has none yet; a site ID taken by another project fails here (choose one with --site).
site_command=(firebase hosting:sites:create "$SITE" --project "$PROJECT" --non-interactive)
hosting_command=(firebase deploy --only hosting --config "$BUILD_DIR/firebase.json" --project "$PROJECT" --non-interactive)
hosting_deployed=0
if ((have_firebase)); then
  show firebase hosting:sites:get "$SITE" --project "$PROJECT" --non-interactive
  if ((!DRY_RUN)) && firebase hosting:sites:get "$SITE" --project "$PROJECT" --non-interactive >/dev/null 2>&1; then
    site_found=1
  else
    site_found=0
  fi
  if ((site_found)) || run "${site_command[@]}"; then
    if run "${hosting_command[@]}"; then hosting_deployed=1; fi
  fi
  ((hosting_deployed)) || firebase_failed
fi
if ((!hosting_deployed)); then
  warn "Firebase Hosting (the base URL $BASE_URL) was NOT deployed. Deploy it from $ROOT with:"
  warn "  $(quoted "${site_command[@]}")   # only if the site does not exist yet"
  warn "  $(quoted "${hosting_command[@]}")"
fi

# --- 11. Firestore security rules, last: the functions reach Firestore with IAM credentials, which rules do
# not govern, so everything above works without them. The rules deny every client (mobile/web SDK, REST
# with end-user tokens) on every path. They come from the tracked firebase.json.
rules_command=(firebase deploy --only firestore:rules --project "$PROJECT" --non-interactive)
rules_deployed=0
if ((have_firebase)); then
  if run "${rules_command[@]}"; then rules_deployed=1; else firebase_failed; fi
fi
if ((!rules_deployed)); then
  warn "firestore.rules was NOT deployed. Deploy the rules from $ROOT with:"
  warn "  $(quoted "${rules_command[@]}")"
fi

echo
if ((DRY_RUN)); then
  echo "Base URL (a dry run deploys nothing): $BASE_URL"
elif ((hosting_deployed)); then
  echo "Base URL: $BASE_URL"
else
  echo "Base URL: $BASE_URL (NOT deployed: see the warnings above; the function URLs below work)"
fi
echo "  every /api/... path, the portal at / and /openapi.json; also at https://$SITE.firebaseapp.com."
echo "  Runners: gbx run --url $BASE_URL ...; an ID token minted for the base URL is accepted by every function."
echo "  gbx itself: $BASE_URL/gbx/ lists its wheel and sha256 (pip install \"gbx-client @ $BASE_URL/gbx/WHEEL#sha256=HEX\")."
if ((DRY_RUN)); then echo "Function URLs (placeholders; a dry run deploys nothing):"; else echo "Function URLs:"; fi
for i in "${!ENTRIES[@]}"; do
  printf '  %-22s %s\n' "${NAMES[$i]}" "${service_uris[$i]}"
done
echo "Each also answers at https://$REGION-$PROJECT.cloudfunctions.net/NAME and https://NAME-$project_number.$REGION.run.app;"
echo "an ID token for any of these URLs or the base URL is accepted (GBX_AUDIENCES)."
echo "Admin token: gcloud secrets versions access latest --secret=$SECRET --project=$PROJECT"
