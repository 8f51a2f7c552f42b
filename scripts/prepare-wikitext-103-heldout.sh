#!/usr/bin/env bash
# Real text when no training split is available: train on WikiText-103's test articles, evaluate on its valid
# articles (shared/data/README.md, "Using these files for real-text runs"; relative comparisons only, never paper
# numbers: state this split next to every number). Word level and the same files as bytes:
#   word: wiki.test.tokens -> train, wiki.valid.tokens -> valid       -> $DATA_BIN/wt103-heldout-word
#   byte: each UTF-8 byte one token (enwik8 format, newline -> </s>)  -> $DATA_BIN/wt103-heldout-byte
# Both data-bins hold train and valid only (dictionary from train, fairseq's default).
#
# Usage: scripts/prepare-wikitext-103-heldout.sh [DIR]
#   DIR holds wiki.valid.tokens and wiki.test.tokens: the first argument, $WIKITEXT103_HELDOUT_DIR, or the shared
#   copy ../shared/data/wikitext-103-valid-test beside the repository. Nothing is downloaded.
# Checks: the sha256 of both files (WIKITEXT103_VALID_SHA256, WIKITEXT103_TEST_SHA256, as prepare-wikitext-103.sh).
# Variables: those of scripts/lib/prepare-common.sh.
set -euo pipefail
# shellcheck source=lib/prepare-common.sh
source "$(dirname "$0")/lib/prepare-common.sh"
pc_init wikitext-103-heldout

SRC=${1:-${WIKITEXT103_HELDOUT_DIR:-$PC_REPO_ROOT/../shared/data/wikitext-103-valid-test}}
VALID_SHA256=${WIKITEXT103_VALID_SHA256-9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b}
TEST_SHA256=${WIKITEXT103_TEST_SHA256-56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9}
TEXT=$DATA_DIR/wt103-heldout
TEXT_FILES=(word/train.txt word/valid.txt byte/train.txt byte/valid.txt)
BIN_FILES=(dict.txt train.bin train.idx valid.bin valid.idx)

done_all=1
pc_complete "$TEXT" "${TEXT_FILES[@]}" || done_all=0
for level in word byte; do pc_complete "$DATA_BIN/wt103-heldout-$level" "${BIN_FILES[@]}" || done_all=0; done
if [ "$done_all" = 1 ] && [ "${FORCE:-0}" != 1 ]; then
  pc_log "already prepared: $TEXT, $DATA_BIN/wt103-heldout-{word,byte} are complete; nothing to do (FORCE=1 rebuilds)"
  exit 0
fi

[ -f "$SRC/wiki.valid.tokens" ] && [ -f "$SRC/wiki.test.tokens" ] \
  || pc_die "$SRC lacks wiki.valid.tokens / wiki.test.tokens: pass the folder holding WikiText-103's valid and \
test files ($0 DIR, or WIKITEXT103_HELDOUT_DIR=DIR); scripts/prepare-wikitext-103.sh extracts them from the \
canonical zip into data/wikitext-103"
PC_OWN_ARCHIVE="" PC_CLEANUP=""
pc_check_hash "$SRC/wiki.valid.tokens" sha256 "$VALID_SHA256" "wiki.valid.tokens" WIKITEXT103_VALID_SHA256
pc_check_hash "$SRC/wiki.test.tokens" sha256 "$TEST_SHA256" "wiki.test.tokens" WIKITEXT103_TEST_SHA256

pc_begin "$TEXT"
pc_py preprocess.wikitext103.heldout --src "$SRC" --outdir "$TEXT"
pc_mark_complete "$TEXT" "train = $SRC/wiki.test.tokens, valid = $SRC/wiki.valid.tokens"

command -v "$FAIRSEQ_PREPROCESS" >/dev/null \
  || pc_die "fairseq-preprocess not found ($FAIRSEQ_PREPROCESS): run 'bash scripts/install.sh' or set \
FAIRSEQ_PREPROCESS"
for level in word byte; do
  dest=$DATA_BIN/wt103-heldout-$level
  rm -rf "$dest"
  pc_begin "$dest"
  pc_log "binarising $level level -> $dest"
  "$FAIRSEQ_PREPROCESS" --only-source --trainpref "$TEXT/$level/train.txt" --validpref "$TEXT/$level/valid.txt" \
    --destdir "$dest" --workers "$WORKERS"
  for f in "${BIN_FILES[@]}"; do [ -s "$dest/$f" ] || pc_die "fairseq-preprocess did not write $dest/$f"; done
  pc_mark_complete "$dest" "wt103-heldout $level: train = wiki.test.tokens, valid = wiki.valid.tokens"
done
pc_log "done: $DATA_BIN/wt103-heldout-word (perplexity) and $DATA_BIN/wt103-heldout-byte (bits per byte): train on \
WikiText-103 test, evaluate on its valid split"
