// The CLIP tokenizer of the page: tokenizer/tokenizer.json read by @huggingface/tokenizers (pure JS),
// padded and truncated like mlcweb_stable_diffusion.tokenizer.Tokenizer, so both give the same ids
// (tests/web/test_js_tokenizer.py checks a set of prompts).

import { Tokenizer } from "./tokenizers.mjs";

export const MAX_LENGTH = 77;

/** CLIP ids for a prompt: start token, BPE tokens, end token, padded to 77 with `padId` (the build's
 * metadata.pad_token_id: end-of-text for SD1, "!" for SD 2.x; end-of-text when not given). */
export class ClipTokenizer {
  constructor(tokenizerJson, padId = undefined) {
    this.tok = new Tokenizer(tokenizerJson, {});
    this.end = this.tok.encode("").ids.at(-1);
    this.pad = padId ?? this.end;
  }

  encode(prompt) {
    let ids = this.tok.encode(prompt).ids;
    if (ids.length > MAX_LENGTH) {
      console.warn(`prompt is ${ids.length} tokens; CLIP reads ${MAX_LENGTH}, so it is truncated`);
      ids = ids.slice(0, MAX_LENGTH - 1).concat([this.end]);
    }
    const out = new Int32Array(MAX_LENGTH).fill(this.pad);
    out.set(ids);
    return out;
  }
}
