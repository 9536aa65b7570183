// `larder serve` through the official OpenAI client (run by tests/e2e_server_test.py,
// which starts the server with stories260K: 128-token context, 16-token KV blocks).
//   LARDER_BASE_URL  http://127.0.0.1:PORT/v1
//   LARDER_MODEL_ID  the served model id
//   LARDER_MAX_SEQ   tokens per request (prompt + completion)
//   LARDER_CONCURRENT number of concurrent streaming clients (default 64)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const baseURL = process.env.LARDER_BASE_URL;
const model = process.env.LARDER_MODEL_ID;
const maxSeq = Number(process.env.LARDER_MAX_SEQ || 128);
const nConcurrent = Number(process.env.LARDER_CONCURRENT || 64);
const BLOCK = 16;
assert.ok(baseURL && model, 'LARDER_BASE_URL and LARDER_MODEL_ID must be set');

const client = new OpenAI({ baseURL, apiKey: process.env.LARDER_API_KEY || 'none', maxRetries: 0, timeout: 60_000 });

// A nonce at the very start keeps a prompt's first KV block unseen by earlier requests.
const nonce = () => `${Math.random().toString(36).slice(2, 8)} ${Date.now() % 100000}.`;
const story =
  ' Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her ' +
  'friends. One day, she saw a big red ball under a tree and ran to get it. Her mom smiled at her.';

function checkUsage(u) {
  assert.equal(typeof u.prompt_tokens, 'number');
  assert.equal(typeof u.completion_tokens, 'number');
  assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
  assert.equal(typeof u.prompt_tokens_details.cached_tokens, 'number');
}

async function streamCompletion(params) {
  const stream = await client.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let finish = null;
  let usage = null;
  let id = null;
  let chunks = 0;
  for await (const ch of stream) {
    chunks++;
    assert.equal(ch.object, 'text_completion');
    assert.ok(ch.id.startsWith('cmpl-'));
    id ??= ch.id;
    assert.equal(ch.id, id, 'one id per stream');
    if (ch.usage) usage = ch.usage;
    if (ch.choices.length === 0) continue;
    assert.equal(finish, null, 'no text after the finish chunk');
    text += ch.choices[0].text;
    if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
  }
  return { text, finish, usage, chunks };
}

async function streamChat(params) {
  const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let finish = null;
  let usage = null;
  let first = true;
  for await (const ch of stream) {
    assert.equal(ch.object, 'chat.completion.chunk');
    assert.ok(ch.id.startsWith('chatcmpl-'));
    if (ch.usage) usage = ch.usage;
    if (ch.choices.length === 0) continue;
    const d = ch.choices[0].delta;
    if (first) {
      assert.equal(d.role, 'assistant', 'the first chunk carries the role');
      first = false;
    }
    if (d.content) text += d.content;
    if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
  }
  return { text, finish, usage };
}

test('models list', async () => {
  const list = await client.models.list();
  const ids = list.data.map((m) => m.id);
  assert.deepEqual(ids, [model]);
  assert.equal(list.data[0].object, 'model');
  const one = await client.models.retrieve(model);
  assert.equal(one.id, model);
});

test('completions: non-streaming shape and streaming gives the same greedy text', async () => {
  const params = { model, prompt: 'Once upon a time', max_tokens: 24, temperature: 0 };
  const r = await client.completions.create(params);
  assert.ok(r.id.startsWith('cmpl-'));
  assert.equal(r.object, 'text_completion');
  assert.equal(typeof r.created, 'number');
  assert.equal(r.model, model);
  assert.equal(r.choices.length, 1);
  const c = r.choices[0];
  assert.equal(c.index, 0);
  assert.equal(typeof c.text, 'string');
  assert.ok(c.text.length > 0);
  assert.equal(c.logprobs, null);
  assert.ok(['stop', 'length'].includes(c.finish_reason));
  checkUsage(r.usage);
  assert.ok(r.usage.completion_tokens <= 24);
  if (c.finish_reason === 'length') assert.equal(r.usage.completion_tokens, 24);

  const s = await streamCompletion(params);
  assert.equal(s.text, c.text);
  assert.equal(s.finish, c.finish_reason);
  checkUsage(s.usage);
  assert.equal(s.usage.completion_tokens, r.usage.completion_tokens);
  assert.equal(s.usage.prompt_tokens, r.usage.prompt_tokens);
  assert.ok(s.chunks >= 3);

  // Token-id prompts are accepted and equivalent to the text.
  const byIds = await client.completions.create({ ...params, prompt: [1, 403, 407, 261, 378] });
  assert.equal(byIds.usage.prompt_tokens, 5);
});

test('chat: non-streaming shape; streaming sends the role first and the same text', async () => {
  const params = {
    model,
    messages: [
      { role: 'system', content: 'You tell short stories.' },
      { role: 'user', content: 'Tell me about a cat.' },
    ],
    max_completion_tokens: 20,
    temperature: 0,
  };
  const r = await client.chat.completions.create(params);
  assert.ok(r.id.startsWith('chatcmpl-'));
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.model, model);
  const c = r.choices[0];
  assert.equal(c.index, 0);
  assert.equal(c.message.role, 'assistant');
  assert.equal(typeof c.message.content, 'string');
  assert.equal(c.logprobs, null);
  assert.ok(['stop', 'length'].includes(c.finish_reason));
  checkUsage(r.usage);
  const s = await streamChat(params);
  assert.equal(s.text, c.message.content);
  assert.equal(s.finish, c.finish_reason);
  assert.equal(s.usage.completion_tokens, r.usage.completion_tokens);
  // Content given as text parts is the same message.
  const parts = await client.chat.completions.create({
    ...params,
    messages: [params.messages[0], { role: 'user', content: [{ type: 'text', text: 'Tell me about a cat.' }] }],
  });
  assert.equal(parts.choices[0].message.content, c.message.content);
});

test('prefix cache: the second identical prompt reports whole cached blocks and the same greedy text', async () => {
  // Long enough to fill several blocks, short enough for the 128-token context.
  const prompt = nonce() + story;
  const params = { model, prompt, max_tokens: 12, temperature: 0 };
  const cold = await client.completions.create(params);
  const L = cold.usage.prompt_tokens;
  assert.ok(L > 3 * BLOCK && L + 12 <= maxSeq, `prompt has ${L} tokens`);
  assert.equal(cold.usage.prompt_tokens_details.cached_tokens, 0, 'cold request');
  const warm = await client.completions.create(params);
  assert.equal(warm.usage.prompt_tokens, L);
  // Whole blocks strictly before the last prompt token (at least one token is computed).
  assert.equal(warm.usage.prompt_tokens_details.cached_tokens, Math.floor((L - 1) / BLOCK) * BLOCK);
  assert.equal(warm.choices[0].text, cold.choices[0].text, 'greedy output equal cold vs cached');
  // Streaming reports it too.
  const s = await streamCompletion(params);
  assert.equal(s.usage.prompt_tokens_details.cached_tokens, Math.floor((L - 1) / BLOCK) * BLOCK);
  assert.equal(s.text, cold.choices[0].text);
  // A prompt sharing the first blocks only: the shared whole blocks are reused.
  const shared = await client.completions.create({ ...params, prompt: prompt.slice(0, 60) + ' The dog barked.' });
  assert.ok(shared.usage.prompt_tokens_details.cached_tokens % BLOCK === 0);
  assert.ok(shared.usage.prompt_tokens_details.cached_tokens < shared.usage.prompt_tokens);
});

test('completions logprobs: tokens, token_logprobs, top_logprobs, text_offset', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 10, temperature: 0, logprobs: 3 });
  const lp = r.choices[0].logprobs;
  const n = r.usage.completion_tokens;
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(lp.tokens.length, n);
  assert.equal(lp.token_logprobs.length, n);
  assert.equal(lp.top_logprobs.length, n);
  assert.equal(lp.text_offset.length, n);
  assert.equal(lp.tokens.join(''), r.choices[0].text, 'tokens spell the text');
  for (let i = 0; i < n; i++) {
    assert.ok(lp.token_logprobs[i] <= 0);
    const top = Object.entries(lp.top_logprobs[i]);
    assert.ok(top.length >= 1 && top.length <= 3);
    // Greedy: the chosen token is the most likely one.
    const best = Math.max(...top.map(([, v]) => v));
    assert.ok(Math.abs(best - lp.token_logprobs[i]) < 1e-4);
    if (i > 0) assert.equal(lp.text_offset[i], lp.text_offset[i - 1] + lp.tokens[i - 1].length);
  }
  // Streaming carries the same entries spread over the chunks.
  const stream = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 10, temperature: 0, logprobs: 3, stream: true });
  const toks = [];
  for await (const ch of stream) if (ch.choices[0]?.logprobs) toks.push(...ch.choices[0].logprobs.tokens);
  assert.deepEqual(toks, lp.tokens);
});

test('chat logprobs: content entries with token, logprob, bytes, top_logprobs', async () => {
  const r = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Hello' }],
    max_tokens: 8,
    temperature: 0,
    logprobs: true,
    top_logprobs: 2,
  });
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, r.usage.completion_tokens);
  for (const e of content) {
    assert.equal(typeof e.token, 'string');
    assert.ok(e.logprob <= 0);
    assert.deepEqual(e.bytes, [...Buffer.from(e.token, 'utf8')]);
    assert.equal(e.top_logprobs.length, 2);
    for (const t of e.top_logprobs) {
      assert.equal(typeof t.token, 'string');
      assert.ok(Array.isArray(t.bytes));
    }
    assert.ok(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob);
  }
});

test('stop strings: matched on text, excluded, generation ends with finish_reason stop', async () => {
  const base = { model, prompt: 'Once upon a time', max_tokens: 40, temperature: 0 };
  const full = (await client.completions.create(base)).choices[0].text;
  assert.ok(full.length > 30, full);
  const stop = full.slice(20, 25);
  const cut = full.indexOf(stop);
  const r = await client.completions.create({ ...base, stop });
  assert.equal(r.choices[0].text, full.slice(0, cut));
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.ok(r.usage.completion_tokens < 40);
  const s = await streamCompletion({ ...base, stop: ['@@never@@', stop] });
  assert.equal(s.text, full.slice(0, cut));
  assert.equal(s.finish, 'stop');
  // The earliest of several stop strings wins.
  const early = full.slice(5, 8);
  const r2 = await client.completions.create({ ...base, stop: [stop, early] });
  assert.equal(r2.choices[0].text, full.slice(0, Math.min(full.indexOf(early), cut)));
  // Chat too.
  const cbase = { model, messages: [{ role: 'user', content: 'Tell me a story.' }], max_tokens: 30, temperature: 0 };
  const cfull = (await client.chat.completions.create(cbase)).choices[0].message.content;
  if (cfull.length > 12) {
    const cstop = cfull.slice(8, 11);
    const cr = await streamChat({ ...cbase, stop: cstop });
    assert.equal(cr.text, cfull.slice(0, cfull.indexOf(cstop)));
    assert.equal(cr.finish, 'stop');
  }
});

test('errors come back as OpenAI errors through the client', async () => {
  await assert.rejects(client.completions.create({ model: 'no-such-model', prompt: 'x', max_tokens: 2 }), (e) => {
    assert.equal(e.status, 404);
    assert.equal(e.code, 'model_not_found');
    return true;
  });
  await assert.rejects(client.completions.create({ model, prompt: 'x', n: 2 }), (e) => e.status === 400);
  await assert.rejects(client.completions.create({ model, prompt: 'x', max_tokens: maxSeq }), (e) => {
    assert.equal(e.status, 400);
    assert.equal(e.code, 'context_length_exceeded');
    return true;
  });
  await assert.rejects(client.chat.completions.create({ model, messages: [] }), (e) => e.status === 400);
});

test(`${nConcurrent} concurrent streaming clients get the same text as sequential greedy runs`, async () => {
  const prompts = [];
  for (let i = 0; i < 8; i++) prompts.push(`Once upon a time, there was a ${['cat', 'dog', 'bird', 'girl', 'boy', 'fish', 'tree', 'car'][i]}`);
  const params = (p) => ({ model, prompt: p, max_tokens: 24, temperature: 0 });
  const want = [];
  for (const p of prompts) want.push((await client.completions.create(params(p))).choices[0].text);
  const scrape = async () => {
    const text = await (await fetch(baseURL.replace(/\/v1\/?$/, '') + '/metrics')).text();
    const num = (name) => Number(text.match(new RegExp(`^${name} (\\S+)`, 'm'))[1]);
    return { gen: num('larder_generated_tokens_total'), steps: num('larder_scheduler_steps_total') };
  };
  const before = await scrape();
  const t0 = Date.now();
  const runs = [];
  for (let i = 0; i < nConcurrent; i++) runs.push(streamCompletion(params(prompts[i % prompts.length])));
  const got = await Promise.all(runs);
  const after = await scrape();
  // Batched: many tokens per scheduler step (one at a time would give at most 1 per step).
  const perStep = (after.gen - before.gen) / Math.max(1, after.steps - before.steps);
  for (let i = 0; i < nConcurrent; i++) {
    assert.equal(got[i].text, want[i % prompts.length], `client ${i}`);
    assert.ok(['stop', 'length'].includes(got[i].finish));
    checkUsage(got[i].usage);
  }
  assert.ok(perStep > 2, `sequences ran batched: ${perStep.toFixed(2)} tokens per step`);
  console.log(`# ${nConcurrent} streams in ${Date.now() - t0} ms, ${perStep.toFixed(2)} generated tokens per scheduler step`);
});
