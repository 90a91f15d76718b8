/* ds_tokenizer.h — HF tokenizer.json (byte-level BPE) in C: text -> token ids -> text.
 *
 * Reads a model directory's tokenizer.json (+ optional tokenizer_config.json) as a user
 * downloads them from a model hub, or the same tokenizer from a GGUF file's metadata. Supported (what DeepSeek-V2/V3 and GPT-2 style models use):
 *   - added_tokens (special or not): split out of the text first, longest match wins, never
 *     run through the pre-tokenizer or BPE;
 *   - pre_tokenizer ByteLevel (GPT-2 regex when use_regex, add_prefix_space) or Sequence of
 *     Split (regex pattern, behavior Isolated/Removed/MergedWith*, invert=false) followed by
 *     ByteLevel (use_regex false); PCRE2 with UTF + UCP;
 *   - byte-level mapping (each byte -> one printable code point, GPT-2's table);
 *   - model BPE with merges spelled "a b" or ["a", "b"]; ignore_merges; no dropout;
 *   - decoder ByteLevel (code points -> bytes); bytes are returned as they are, so invalid
 *     UTF-8 round-trips byte for byte;
 *   - BOS: tokenizer_config.json add_bos_token (default false when absent) and bos_token
 *     (a string or an {"content": ...} object).
 * Anything else in tokenizer.json (normalizers, other models) is refused with a clear error,
 * never silently ignored.
 *
 * Thread safety: a ds_tokenizer is read-only after load; encode/decode may run concurrently.
 * A ds_tok_stream belongs to one thread. */
#ifndef DS_TOKENIZER_H
#define DS_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_err.h"

/* Input limits (external files are validated against them; -ERANGE past a limit). */
#define DS_TOK_MAX_FILE_BYTES  (64u << 20)  /* tokenizer.json size */
#define DS_TOK_MAX_VOCAB       (1u << 20)   /* ids in vocab + added tokens */
#define DS_TOK_MAX_TOKEN_BYTES 1024u        /* one token's decoded length */
#define DS_TOK_MAX_TEXT_BYTES  (256u << 20) /* one encode call's input */

typedef struct ds_tokenizer ds_tokenizer;

/* Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json; or, when DIR is a
 * GGUF file (or a part of a split set), the tokenizer in its metadata (ds_tokenizer_load_gguf). */
int ds_tokenizer_load(const char *dir, ds_tokenizer **ret, ds_error *err);
/* The tokenizer of a GGUF file's tokenizer.ggml.* metadata: model "gpt2" (byte-level BPE),
 * tokens (id = index), token_type (CONTROL = special added token, USER_DEFINED = added token),
 * merges, bos/eos_token_id, add_bos_token, and pre = gpt-2, deepseek-v3, deepseek-llm or
 * deepseek-coder (the pre-tokenizer regexes of those models' tokenizer.json). Anything else is
 * refused naming the file and key. */
struct ds_gguf;
int ds_tokenizer_load_gguf(const struct ds_gguf *g, ds_tokenizer **ret, ds_error *err);
/* Same from explicit paths; config_path may be NULL (then no BOS is added). */
int ds_tokenizer_load_files(const char *tokenizer_json, const char *config_path, ds_tokenizer **ret,
                            ds_error *err);
ds_tokenizer *ds_tokenizer_free(ds_tokenizer *t);

/* Number of ids (max id + 1 over vocab and added tokens). */
uint32_t ds_tokenizer_vocab_size(const ds_tokenizer *t);
/* BOS / EOS ids from tokenizer_config.json (bos_token / eos_token), -1 when none. */
int32_t ds_tokenizer_bos_id(const ds_tokenizer *t);
int32_t ds_tokenizer_eos_id(const ds_tokenizer *t);
/* Whether encode with add_special=true prepends BOS (tokenizer_config add_bos_token). */
bool ds_tokenizer_adds_bos(const ds_tokenizer *t);
/* Whether id is an added token marked "special" (decode may skip these). */
bool ds_tokenizer_is_special(const ds_tokenizer *t, int32_t id);

/* id -> token string as stored in the vocab (byte-level code points, UTF-8), or NULL for an
 * unknown id. The pointer lives as long as t. */
const char *ds_tokenizer_id_to_token(const ds_tokenizer *t, int32_t id);
/* token string (vocab spelling) -> id, or -1. */
int32_t ds_tokenizer_token_to_id(const ds_tokenizer *t, const char *token);

/* Encodes len bytes of text (any bytes; invalid UTF-8 is first replaced by U+FFFD per maximal
 * invalid subpart, as Python's errors="replace" does, so ids match HF's). add_special: prepend BOS when the config asks for it. On success
 * *ids is a malloc'd array (caller frees) of *n ids. */
int ds_tokenizer_encode(const ds_tokenizer *t, const char *text, size_t len, bool add_special,
                        int32_t **ids, size_t *n, ds_error *err);

/* Decodes n ids to bytes (not NUL-terminated in general: *out gets a malloc'd buffer with a
 * trailing NUL that is not counted in *out_len). skip_special: drop special added tokens.
 * -ERANGE with err for an id outside the vocab. */
int ds_tokenizer_decode(const ds_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                        char **out, size_t *out_len, ds_error *err);

/* --- Streaming decode -------------------------------------------------------------------
 * Feed ids one at a time as they are generated; each call yields only complete UTF-8
 * characters and holds back a trailing partial sequence until later bytes complete it (or
 * prove it invalid: then the bytes are emitted as they are, so nothing is lost). */
typedef struct ds_tok_stream ds_tok_stream;

int ds_tok_stream_new(const ds_tokenizer *t, bool skip_special, ds_tok_stream **ret);
ds_tok_stream *ds_tok_stream_free(ds_tok_stream *s);
/* Appends the bytes of id; *out points to the bytes ready to print (valid until the next call
 * on s), *out_len their count (may be 0). */
int ds_tok_stream_push(ds_tok_stream *s, int32_t id, const char **out, size_t *out_len,
                       ds_error *err);
/* Returns whatever is still held (an incomplete sequence at end of generation). */
int ds_tok_stream_flush(ds_tok_stream *s, const char **out, size_t *out_len);

#endif
