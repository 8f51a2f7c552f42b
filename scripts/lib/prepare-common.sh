# shellcheck shell=bash
# Shared logic of scripts/prepare-<corpus>.sh. Source it (after `set -euo pipefail`), then call pc_init.
#
# Environment understood by every prepare script:
#   DATA_DIR (default: data)         raw/tokenised text goes to $DATA_DIR/<corpus>/
#   DATA_BIN (default: data-bin)     fairseq-preprocess output goes to $DATA_BIN/<corpus>/
#   WORKERS  (default: nproc)        fairseq-preprocess --workers
#   PYTHON   (default: .venv/bin/python of this repo, else python3)
#   FAIRSEQ_PREPROCESS (default: fairseq-preprocess next to $PYTHON, else on PATH)
#   FORCE=1                          rebuild even when the outputs are complete
#   CURL_CONNECT_TIMEOUT (default 10 s), CURL_RETRY (default 0)
# Checksum and size variables set to the empty string skip that check (with a warning).

PC_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PC_NAME=prepare
PC_OWN_ARCHIVE=""  # an archive this script downloaded (now or in an earlier run)
PC_CLEANUP=""  # space-separated intermediate files that pc_reject deletes

pc_log() { echo "[$PC_NAME] $*"; }
pc_warn() { echo "[$PC_NAME] warning: $*" >&2; }
pc_die() { echo "[$PC_NAME] error: $*" >&2; exit 1; }

# pc_init NAME: set defaults for the variables above and make `python -m preprocess...` importable.
pc_init() {
  PC_NAME=$1
  DATA_DIR=${DATA_DIR:-data}
  DATA_BIN=${DATA_BIN:-data-bin}
  WORKERS=${WORKERS:-$(nproc 2>/dev/null || echo 1)}
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$PC_REPO_ROOT/.venv/bin/python" ]; then PYTHON="$PC_REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
  fi
  if [ -z "${FAIRSEQ_PREPROCESS:-}" ]; then
    local beside
    beside="$(dirname "$(command -v "$PYTHON" || echo "$PYTHON")")/fairseq-preprocess"
    if [ -x "$beside" ]; then FAIRSEQ_PREPROCESS=$beside; else FAIRSEQ_PREPROCESS=fairseq-preprocess; fi
  fi
  export PYTHONPATH="$PC_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# pc_py MODULE ARGS...: run one of the preprocess/ modules.
pc_py() { "$PYTHON" -m "$@"; }

# pc_stamp DIR: the marker file written once everything in DIR is complete.
pc_stamp() { echo "$1/.prepared"; }

# pc_complete DIR FILE...: true when DIR holds its completion stamp and every FILE (relative to DIR).
pc_complete() {
  local dir=$1; shift
  [ -f "$(pc_stamp "$dir")" ] || return 1
  local f
  for f in "$@"; do [ -s "$dir/$f" ] || return 1; done
}

# pc_begin DIR: start (re)building DIR: drop its stamp first, so an interrupted build never looks complete.
pc_begin() { mkdir -p "$1"; rm -f "$(pc_stamp "$1")"; }

# pc_mark_complete DIR NOTE: write DIR's completion stamp.
pc_mark_complete() { printf '%s\n' "$2" > "$(pc_stamp "$1")"; }

# pc_bin_files: the files fairseq-preprocess --only-source writes for train/valid/test.
pc_bin_files() { echo dict.txt train.bin train.idx valid.bin valid.idx test.bin test.idx; }

# pc_need DIR FILE...: true when DIR must be (re)built: FORCE=1, or DIR is not complete.
pc_need() {
  [ "${FORCE:-0}" = 1 ] && return 0
  ! pc_complete "$@"
}

# pc_exit_if_done TEXTDIR BINDIR... -- TEXTFILE...: exit 0 when the text dir and every bin dir are complete.
pc_exit_if_done() {
  local dirs=()
  while [ "$1" != -- ]; do dirs+=("$1"); shift; done
  shift
  local textdir=${dirs[0]} bindir
  [ "${FORCE:-0}" = 1 ] && return 0
  pc_complete "$textdir" "$@" || return 0
  for bindir in "${dirs[@]:1}"; do
    # shellcheck disable=SC2046  # pc_bin_files prints plain file names
    pc_complete "$bindir" $(pc_bin_files) || return 0
  done
  pc_log "already prepared: ${dirs[*]} are complete; nothing to do (FORCE=1 or delete them to rebuild)"
  exit 0
}

# shellcheck disable=SC2034  # PC_ARCHIVE is read by the calling script
# pc_fetch_archive VARNAME GIVEN URL DEST: set PC_ARCHIVE to the archive to use.
#   GIVEN is the script's first argument or the value of VARNAME (may be empty); it must exist.
#   Otherwise DEST is used if a previous run downloaded it, else URL is downloaded to DEST with curl.
pc_fetch_archive() {
  local var=$1 given=$2 url=$3 dest=$4
  PC_OWN_ARCHIVE=""
  if [ -n "$given" ]; then
    [ -f "$given" ] || pc_die "archive '$given' (first argument or \$$var) does not exist"
    PC_ARCHIVE=$given
    pc_log "using archive $given"
    return 0
  fi
  if [ -f "$dest" ]; then
    PC_ARCHIVE=$dest
    PC_OWN_ARCHIVE=$dest
    pc_log "using previously downloaded $dest"
    return 0
  fi
  command -v curl >/dev/null || pc_die "curl not found. Download $url on a machine with network access and pass it: $0 /path/to/$(basename "$dest") (or $var=/path/to/$(basename "$dest"))"
  mkdir -p "$(dirname "$dest")"
  pc_log "downloading $url -> $dest"
  local rc=0
  # Fail fast when offline (connect timeout) and when a transfer stalls (< 1 KB/s for a minute).
  curl -fL --connect-timeout "${CURL_CONNECT_TIMEOUT:-10}" --speed-limit 1024 --speed-time 60 \
    --retry "${CURL_RETRY:-0}" -o "$dest.part" "$url" || rc=$?
  if [ "$rc" != 0 ]; then
    rm -f "$dest.part"
    pc_die "could not download $url (curl exit code $rc; no network?).
  Fix 1: pass an already-downloaded archive: $0 /path/to/$(basename "$dest")   (or set $var=/path/to/$(basename "$dest"))
  Fix 2: download $url on a machine with network access and copy it here, then use fix 1."
  fi
  mv "$dest.part" "$dest"
  PC_ARCHIVE=$dest
  PC_OWN_ARCHIVE=$dest
}

# pc_reject MESSAGE: fail on a bad file. Intermediate files ($PC_CLEANUP) and an archive the script
#   downloaded itself are deleted (a rerun then fetches it again); an archive the user gave is never touched.
pc_reject() {
  local msg=$1
  # shellcheck disable=SC2086  # PC_CLEANUP is a space-separated list
  [ -z "$PC_CLEANUP" ] || rm -f $PC_CLEANUP
  if [ -n "$PC_OWN_ARCHIVE" ] && [ -f "$PC_OWN_ARCHIVE" ]; then
    rm -f "$PC_OWN_ARCHIVE"
    msg="$msg (deleted the downloaded $PC_OWN_ARCHIVE)"
  fi
  pc_die "$msg"
}

# pc_check_size FILE EXPECTED LABEL VARNAME: the file must have EXPECTED bytes (skipped when EXPECTED is empty).
pc_check_size() {
  local file=$1 expected=$2 label=$3 var=$4
  if [ -z "$expected" ]; then pc_warn "size check of $label skipped (\$$var is empty)"; return 0; fi
  local actual
  actual=$(wc -c < "$file" | tr -d ' ')
  [ "$actual" = "$expected" ] || pc_reject "size mismatch for $label ($file): expected $expected bytes, got $actual.
  The file is truncated or not the canonical one. (\$$var overrides the expected size, for tests only.)"
  pc_log "size ok: $label ($actual bytes)"
}

# pc_check_hash FILE ALGO EXPECTED LABEL VARNAME: ALGO is md5, sha1 or sha256 (skipped when EXPECTED is empty).
pc_check_hash() {
  local file=$1 algo=$2 expected=$3 label=$4 var=$5
  if [ -z "$expected" ]; then pc_warn "$algo check of $label skipped (\$$var is empty)"; return 0; fi
  local actual
  actual=$("${algo}sum" "$file" | cut -d' ' -f1)
  [ "$actual" = "$expected" ] || pc_reject "checksum mismatch for $label ($file): expected $algo $expected, got $actual.
  The file is corrupt or not the canonical one. (\$$var overrides the expected $algo, for tests only.)"
  pc_log "$algo ok: $label"
}

# pc_binarise NAME TRAIN VALID TEST DESTDIR [fairseq-preprocess args...]: build DESTDIR, the dictionary
#   from TRAIN only (fairseq's default), then check the outputs and stamp DESTDIR complete.
pc_binarise() {
  local name=$1 train=$2 valid=$3 test=$4 destdir=$5; shift 5
  if ! command -v "$FAIRSEQ_PREPROCESS" >/dev/null; then
    pc_die "fairseq-preprocess not found ($FAIRSEQ_PREPROCESS): run 'bash scripts/install.sh' or set FAIRSEQ_PREPROCESS"
  fi
  # fairseq-preprocess refuses to overwrite a dict.txt, so a partial earlier output is removed first.
  rm -rf "$destdir"
  pc_begin "$destdir"
  pc_log "binarising $name -> $destdir"
  "$FAIRSEQ_PREPROCESS" --only-source --trainpref "$train" --validpref "$valid" --testpref "$test" \
    --destdir "$destdir" --workers "$WORKERS" "$@"
  local f
  for f in $(pc_bin_files); do
    [ -s "$destdir/$f" ] || pc_die "fairseq-preprocess did not write $destdir/$f"
  done
  pc_mark_complete "$destdir" "$name: fairseq-preprocess --only-source $* (dictionary from $train)"
  pc_log "$destdir: $(wc -l < "$destdir/dict.txt" | tr -d ' ') dictionary entries in dict.txt (+4 specials)"
}
