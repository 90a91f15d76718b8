/* dsd_chat.h — the chat templates of the DeepSeek family (dsd_chat.c): recognised by their
 * content and rendered in C (there is no Jinja here). Pure: no sockets, no clocks. */
#ifndef DSD_CHAT_H
#define DSD_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds_err.h"

/* ---- chat templates (dsd_chat.c) ---------------------------------------------------------- */

enum dsd_chat_family {
    DSD_CHAT_FAMILY_V2,  /* "User: ...\n\nAssistant: ..." (DeepSeek-V2-Chat) */
    DSD_CHAT_FAMILY_V3,  /* <｜User｜>/<｜Assistant｜> (DeepSeek-V2.5, V3) */
    DSD_CHAT_FAMILY_R1,  /* V3's form, reasoning stripped from the history (DeepSeek-R1) */
    DSD_CHAT_FAMILY_V31, /* V3.1: <think>/</think> after <｜Assistant｜>, `thinking` switch */
};

typedef struct dsd_chat_template {
    enum dsd_chat_family family;
    bool system_concat;  /* several system messages joined with "\n\n" (else the last wins) */
    bool strip_think;    /* assistant history keeps only the text after its last </think> */
    bool gen_think;      /* the generation prompt ends with "<think>\n" (R1-0528) */
    bool tool_output_nl; /* "\n" before every tool output but the first */
    char name[16];       /* "deepseek-v3", ... for logs and /v1/models */
} dsd_chat_template;

/* One message of a conversation; content is UTF-8 text (parts already joined). */
typedef struct dsd_chat_msg {
    const char *role; /* system | user | assistant | tool */
    const char *content;
} dsd_chat_msg;

/* Recognises a chat template (Jinja text from tokenizer_config.json `chat_template` or GGUF
 * `tokenizer.chat_template`) by what it contains. -ENOTSUP with err naming the way out
 * (chat_template_file) when it is not one of the forms above; source names it in the message. */
int dsd_chat_template_detect(const char *text, size_t len, const char *source, dsd_chat_template *t,
                             ds_error *err);
/* Renders messages as the template would with HF's apply_chat_template(tokenize=False).
 * thinking: V3.1's switch (others ignore it). *out is malloc'd, caller frees. -EINVAL with err
 * for a role the template does not know; -ERANGE past DSD_CHAT_MAX_BYTES. */
#define DSD_CHAT_MAX_BYTES (64u << 20)
int dsd_chat_render(const dsd_chat_template *t, const dsd_chat_msg *m, size_t n,
                    bool add_generation_prompt, bool thinking, const char *bos, const char *eos,
                    char **out, size_t *len, ds_error *err);

#endif
