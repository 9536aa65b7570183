#!/usr/bin/env python3
"""Fidelity suite for per-document KV reuse in RAG prompts (seeded, deterministic).

  docs_fidelity.py gen --out cases.jsonl --seed S [--questions 300] [--docs-per-question 8]
                   [--corpus-docs 64] [--two-hop-frac 0.1] [--facts-per-doc 1.25] [--doc-tokens 128,512]
                   [--doc-skew 5] [--real-text N] [--text-pages P.html,...]
  docs_fidelity.py report --results results.jsonl [--md out.md] [--svg plot.svg] [--boot 2000]
                   [--best focus] [--seed 1]
  docs_fidelity.py calibrate --cases cases.jsonl [--limit 60] [--skip 0] [--kinds single,two_hop]
                   [--model GGUF] [--larder build/bin/larder] [--threads 2] [-n 8] [--url http://HOST:PORT]
                   [--out seq.jsonl] [--tokens-only] [-v]

A RAG prompt is prefix + documents + query. Per-document KV reuse encodes each corpus document once
(alone, at its own positions) and reuses that KV wherever the document recurs, in any order, instead
of prefilling the whole prompt. The methods compared: sequential (full prefill, the reference),
parallel / APE (documents' caches side by side, no recompute), reposition (caches moved to their
place in the prompt, RoPE re-rotated, no recompute), blend (CacheBlend: recompute the tokens whose
KV deviates most), link (EPIC: recompute each document's first tokens), focus (ours). The suite
measures how far each stays from the sequential reference.

gen writes one JSON line per case:
  {"id", "kind": "single"|"two_hop"|"text", "needle_pos": "first"|"middle"|"last", "prefix", "docs",
   "doc_ids", "query", "answer", ...}
plus "relation" (person_code | person_city | city_code | person_city_code | continuation),
"needle_index" (index in docs of the answer-bearing document), on two_hop cases "bridge_index" (the
document naming the person's city) and "decoy_index" (a document with the same city attribute for
another city), on text cases "continuation": true and "page".

  Corpus (--corpus-docs, default 64; ids 0..N-1): templated English prose, a title line naming an
  invented place and two paragraphs of sentences drawn from ~50 filler templates (places, weather,
  history, trade, buildings; years; nameless "the old port", "the village to the north"), with
  --facts-per-doc facts (default 1.25: every document 1, some 2) at random places:
    person_code   "Winthrop's pension number is 13077."       (25 attributes)
    person_city   "Ingrid works in the city of Kyoto."        (8 relations: lives in, was born in, ...)
    city_code     "The museum number of Granada is 24123."    (15 attributes)
  Names (real first names for people, real city names for cities) are unique across the corpus and
  chosen so that no two start with the same token; values are random 5-digit numbers; each fact
  appears once. Two-hop chains: a residence fact and its city's code fact in two different
  documents. Document length: MIN + (MAX-MIN) * u**skew tokens (--doc-tokens 128,512, --doc-skew 5;
  measured below). Each document ends with "\n\n".

  Questions (--questions, QA cases only): a share --two-hop-frac of two_hop ("What is the museum number
  of the city where Hortense was born?"), the rest single hop, split evenly over the three relations
  ("What is Winthrop's pension number?", "In which city does Ingrid work?", "What is the museum
  number of Granada?"). Each takes the needed document(s) plus distractors drawn from the corpus
  (--docs-per-question, default 8); the answer-bearing document is placed first / middle / last
  (balanced per kind, recorded in needle_pos and needle_index); the other documents (two_hop: the
  bridge and the decoy too) in a random order. Corpus documents recur across questions (64 docs, 300
  questions x 8: each document in ~37 prompts), the point of encoding each once.

  prefix = "<|im_start|>system\\n<system prompt><|im_end|>\\n<|im_start|>user\\n" (SmolLM2's ChatML;
  the same for every case, so its KV is shared too); query = "Question: ...<|im_end|>\\n
  <|im_start|>assistant\\n" followed by an answer lead-in ("Winthrop's pension number is", "Ingrid
  works in the city of", "The museum number of the city where Hortense was born is"). The greedy
  output is exactly correct (em) when, with spaces removed, it starts with the answer.

  --real-text N: N extra cases of kind "text": the Python library reference shipped by Debian
  (python3-doc; scripts/python_doc_text.py) of several pages (--text-pages), each page cut by lines
  into chunks of ~200-400 tokens (chunk ids continue after the fact corpus's ids; they recur across
  text cases); a case is --docs-per-question consecutive chunks of one page, and its query is the
  ~64-token passage that follows the last chunk in the source ("answer": "", "continuation": true;
  measured by the continuation's teacher-forced perplexity). needle_pos cycles so text cases spread
  over the table, but has no meaning for them.

report reads results lines {"id", "kind", "needle_pos", "method", "em" (absent for text), "kl_first",
"kl_mean32", "top1_agree", "recompute", "ttft_s", "ppl" (text)} (method "sequential" is the
reference; settings in names, e.g. "blend-15", "focus-0.2") and prints markdown: per method EM, EM
ratio to sequential, mean KL at the answer position and over 32 teacher-forced tokens, top-1
agreement, recompute fraction, median TTFT and speed-up (ratio of medians), perplexity ratio on
text cases (geometric mean of the paired per-case ratios); the same by kind and by needle position;
paired bootstrap 95% intervals (resampling cases) of the EM difference and the answer-KL
difference between --best (default focus; the best-EM method of that family when only settings of
it exist, e.g. focus-0.2) and each other method. --svg: a hand-written two-panel scatter plot,
EM ratio and mean answer KL against recompute fraction, one labelled point per method/setting.

calibrate runs the sequential reference only: every piece (prefix, each doc, query) is tokenized
alone by `larder tokenize --json-batch --parse-special` (no BOS: SmolLM2 adds none; its <|im_start|>
is the BOS id) and the ids concatenated, as a per-document cache would see them (tokenizing the
joined text instead gives a few more tokens: a document's final "\\n\\n" then splits before the next
title; 1182 vs 1174 ids on q0000), then sent as a
token-id prompt to `larder serve`'s /v1/completions (temperature 0, max_tokens -n). Prints EM overall,
by kind / relation / needle position, and the documents' token lengths.

Calibration (SmolLM2-135M-Instruct.Q4_1.gguf, larder serve, 2 threads, max_tokens 8, greedy; cases of
`gen --seed 1 --questions 300 --real-text 30`, i.e. every default):
  QA cases q0000-q0119 (`calibrate --limit 60`, then `--skip 60 --limit 60`): 99/120 = 82.5% exact.
    single  93/107 = 86.9%  (person_code 24/27 = 88.9%, city_code 33/37 = 89.2%, person_city 36/43 = 83.7%)
    two_hop  6/13  = 46%
    needle first 32/40 = 80.0%, middle 28/40 = 70.0%, last 39/40 = 97.5%
  all 30 two_hop cases (`--kinds two_hop --limit 30`): 14/30 = 46.7% (first 1/10, middle 5/10, last 8/10).
  Expected EM over all 300 QA cases: 0.9 x 86.9% + 0.1 x 46.7% = 83%. Two-hop is hard for a 135M model,
  hence the default --two-hop-frac 0.1; at 0.2 the suite would sit at ~79%. A two_hop prompt always holds
  a decoy document with a city fact of the same attribute (decoy_index), so the attribute alone does not
  give the answer (without decoys it did in 26 of 30 prompts). The model's recency bias shows in the
  needle positions; most wrong answers copy the value of another fact, often in the next document.
  Larder's greedy outputs matched llama.cpp's (same GGUF, same token ids) on the 10 prompts compared:
  the low numbers are the model's, not the engine's.
  Token lengths (larder tokenize): fact documents 124-481, median 146, mean 203 (p75 236); QA prompts
  1116-2569, median 1606; query 21-38. Text chunks 174-487, median 302; continuation 42-86, median 64;
  text prompts 2100-2818.
  How the templates got there (sequential EM, 8 documents): one attribute for every fact ("The code of
  X is N.") with invented two-part names sharing first tokens: 31%; names with unique first tokens: 33%;
  many attributes/relations and 2-3 facts per document: 55-64%; 1.25 facts per document: 75-78%;
  plain fact sentences only (no "For the record, ..." variants) and no word-like attributes: 80-85%.
"""
import argparse
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SYSTEM = "You are a helpful assistant. Answer the question using the documents."
PREFIX = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n"
Q_HEAD = "Question: "
Q_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
POSITIONS = ("first", "middle", "last")

# ---------------------------------------------------------------------------------------------------
# Names

# Person and city names: each has a first token (SmolLM2's tokenizer, with the leading space) that no
# other name in these lists starts with, so a 135M model can find a name by induction; with shared first
# tokens (invented "Mira Tolvane"-style names) sequential EM fell to ~30%.
PERSONS = ["Margaret", "Theodore", "Beatrice", "Winston", "Reginald", "Harriet", "Cornelius", "Penelope", "Bartholomew",
"Josephine", "Leopold", "Augustus", "Matilda", "Percival", "Ignatius", "Millicent", "Humphrey",
"Gertrude", "Archibald", "Eleanor", "Montgomery", "Benedict", "Lavinia", "Fitzgerald", "Imogen", "Cuthbert",
"Ophelia", "Nathaniel", "Cordelia", "Sebastian", "Wilhelmina", "Ambrose", "Philippa", "Barnaby", "Henrietta",
"Crispin", "Prudence", "Desmond", "Clementine", "Ezekiel", "Georgiana", "Lucian", "Isadora", "Mortimer",
"Marigold", "Rupert", "Ottoline", "Jasper", "Percy", "Araminta", "Horace", "Drusilla", "Tobias", "Evangeline",
"Alistair", "Solomon", "Hyacinth", "Ferdinand", "Lucinda", "Casimir", "Honoria", "Seraphina", "Phineas",
"Bernadette", "Lysander", "Euphemia", "Thaddeus", "Arabella", "Valentine", "Jeremiah", "Perpetua", "Cyprian",
"Anastasia", "Balthazar", "Celestine", "Dorian", "Esmeralda", "Felicity", "Hamish", "Ingrid", "Katarina",
"Lorcan", "Magdalena", "Octavia", "Peregrine", "Quentin", "Rowena", "Silvester", "Tabitha", "Ulysses",
"Wendell", "Xavier", "Yolanda", "Zachariah", "Agatha", "Boniface", "Constance", "Diggory", "Edwina", "Fabian",
"Gwyneth", "Hector", "Keturah", "Leander", "Mabel", "Norbert", "Odette", "Ptolemy", "Rufus", "Sybil",
"Tristan", "Ursula", "Virgil", "Winthrop", "Zenobia", "Bathsheba", "Delphine", "Erasmus", "Fenella", "Godfrey",
"Hortense"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Perth", "Riga", "Tunis", "Porto", "Bergen", "Krakow", "Seville", "Malaga",
"Geneva", "Zurich", "Leipzig", "Utrecht", "Ghent", "Turin", "Verona", "Bologna", "Naples", "Palermo",
"Valencia", "Bilbao", "Toledo", "Granada", "Tallinn", "Vilnius", "Helsinki", "Tampere", "Poznan", "Brno",
"Graz", "Salzburg", "Split", "Zagreb", "Sofia", "Varna", "Izmir", "Antalya", "Beirut", "Amman", "Muscat",
"Doha", "Kochi", "Mysore", "Pune", "Goa", "Jaipur", "Kandy", "Colombo", "Ipoh", "Manila", "Osaka", "Nagoya",
"Sapporo", "Busan", "Taipei", "Harbin", "Lhasa", "Baku", "Kharkiv", "Sarajevo", "Skopje", "Tirana", "Nicosia",
"Reykjavik", "Aarhus", "Uppsala", "Galway", "Cork", "Belfast", "Cardiff", "Bristol", "Leeds", "Dundee",
"Halifax", "Quebec", "Winnipeg", "Calgary", "Denver", "Tucson", "Memphis", "Boise", "Fresno", "Omaha",
"Havana", "Recife", "Manaus", "Rosario", "Mendoza", "Asuncion", "Montevideo"]
# Fallback syllables when a corpus needs more names than the lists hold (less distinct names).
SUR_A = ["Tol", "Ver", "Kas", "Mor", "Bel", "Dun", "Hal", "Rin", "Sel", "Cor", "Fal", "Gar", "Lin",
         "Mar", "Nor", "Pel", "Quen", "Ros", "Stav", "Tir", "Val", "Wen", "Ask", "Brel", "Dov"]
SUR_B = ["vane", "dell", "holm", "wick", "stad", "bury", "mont", "land", "rick", "sen", "ford",
         "gard", "ley", "berg", "ton", "ard", "rath", "quist", "more", "by"]
REGION_A = ["Ash", "Birch", "Cold", "Deep", "Elder", "Fair", "Green", "High", "Iron", "Long", "Mill",
            "North", "Oak", "Pine", "Red", "Salt", "Stone", "Thorn", "West", "White", "Wolf", "Black"]
REGION_B = ["mere", "dale", "moor", "field", "brook", "haven", "ridge", "marsh", "wood", "combe",
            "fell", "water", "hollow", "reach", "stead"]


def make_names(rng, n, base, taken, a=None, b=None):
    """n unique names: the base list (shuffled) first, then a+b syllable pairs."""
    pool = list(base)
    rng.shuffle(pool)
    extra = [x + y for x in (a or []) for y in (b or [])]
    rng.shuffle(extra)
    out = []
    for s in pool + extra:
        if s in taken:
            continue
        taken.add(s)
        out.append(s)
        if len(out) == n:
            return out
    raise SystemExit("name pool too small for %d names" % n)


# ---------------------------------------------------------------------------------------------------
# Filler prose

ADJ_WEATHER = ["mild", "cold", "wet", "dry", "windy", "foggy", "bright", "grey", "stormy", "calm"]
SEASONS = ["spring", "summer", "autumn", "winter"]
GOODS = ["wool", "salt", "timber", "grain", "copper", "linen", "honey", "pottery", "dried fish",
         "leather", "glass", "cheese", "wine", "iron tools", "rope"]
BUILDINGS = ["a stone bridge", "an old mill", "a market hall", "a small chapel", "a lighthouse",
             "a watchtower", "a granary", "a library", "a town hall", "a covered well", "a school"]
PEOPLE_GROUPS = ["farmers", "fishermen", "traders", "monks", "weavers", "miners", "shepherds",
                 "carpenters", "sailors", "potters"]
FEATURES = ["river", "valley", "lake", "forest", "hill", "coast", "plain", "marsh", "pass", "bay"]

FILLER = [
    "The weather in {region} is usually {w} in {season}.",
    "In {season} the {feature} near {region} is often {w} for weeks at a time.",
    "Travellers say that the road to {region} is long but pleasant in {season}.",
    "The {feature} of {region} was mapped for the first time in {year}.",
    "{region} was founded by {group} in {year}, according to the local records.",
    "Most of the houses in {region} are built from grey stone and old timber.",
    "A great storm struck {region} in {year} and destroyed {building}.",
    "The people of {region} trade {good} and {good2} with their neighbours.",
    "Every {season}, a fair is held in {region} where {group} sell {good}.",
    "{region} lies on the edge of a wide {feature}, about a day's walk from the sea.",
    "The oldest building in {region} is {building}, built around {year}.",
    "In {year} the council of {region} paid for {building} near the {feature}.",
    "Rain falls on {region} for much of the {season}, and the paths turn to mud.",
    "Snow rarely reaches {region}, but the winds from the {feature} can be strong.",
    "Historians believe that {group} first settled near the {feature} of {region} long ago.",
    "The main street of {region} runs from {building} down to the {feature}.",
    "During {season} evenings, the sky over {region} turns a deep orange.",
    "A small museum in {region} shows tools used by {group} in the old days.",
    "The soil around {region} is good for barley, oats and apples.",
    "Local songs from {region} tell of a flood that came in {year}.",
    "The {feature} beside {region} freezes in the coldest winters.",
    "Merchants from {region} once carried {good} over the {feature} by cart.",
    "A census in {year} counted a few thousand people living in {region}.",
    "In {region}, the {season} festival lasts three days and ends with music.",
    "The road between {region} and {region2} was paved in {year}.",
    "{region} and {region2} have argued about the border at the {feature} for a century.",
    "Fog often covers {region2} in the morning, while {region} stays clear.",
    "Visitors to {region} often walk along the {feature} to see the view.",
    "The harbour of {region2} ships {good} to distant towns every {season}.",
    "Old maps show {building} in {region}, though it is gone today.",
    "The library of {region2} keeps letters written by {group} in {year}.",
    "Summers in {region2} are short, and the days are long and {w}.",
    "A railway reached {region} in {year}, and trade in {good} grew quickly.",
    "Children in {region} learn the history of the {feature} at school.",
    "The {group} of {region2} are known for their careful work.",
    "Wild geese rest on the {feature} near {region} every {season}.",
    "The bells of {building} in {region} ring at noon each day.",
    "After the fire of {year}, {region2} was rebuilt in brick.",
    "The climate of {region} has changed a little, or so the older people say.",
    "There is a legend that {group} hid gold somewhere in the {feature} of {region}.",
    "{region2} is famous for its {good}, which is sold as far as the coast.",
    "The river that runs through {region} is slow and shallow in {season}.",
    "Many families in {region} have kept {good} workshops for generations.",
    "A treaty signed in {region2} in {year} ended a long dispute over the {feature}.",
    "The winters in {region2} are {w}, and the {feature} is hard to cross.",
    "A path of flat stones leads from {region} to {building} on the hill.",
    "Few records survive from {region} before {year}.",
    "The market in {region2} opens at dawn and closes at noon.",
]

# Facts. {p} person, {c} city, {v} value.
# Many attributes and relations: a 135M model finds a fact mostly by its attribute, less by its name
# (with one attribute, "The code of X is", sequential EM was ~30-50% on 8 documents).
PERSON_ATTRS = ["badge number", "locker number", "room number", "ticket number", "phone extension",
                "account number", "member number", "parcel number", "desk number", "permit number",
                "library card number", "pension number", "boat licence number", "passport number", "seat number",
                "mailbox number", "order number", "voter number", "student number", "house number",
                "invoice number", "loan number", "claim number", "payroll number", "employee number"]
PERSON_CITY = [("lives in", "{p} lives in the city of {c}."), ("was born in", "{p} was born in the city of {c}."),
               ("works in", "{p} works in the city of {c}."), ("grew up in", "{p} grew up in the city of {c}."),
               ("studied in", "{p} studied in the city of {c}."), ("retired to", "{p} retired to the city of {c}."),
               ("teaches in", "{p} teaches in the city of {c}."), ("was married in", "{p} was married in the city of {c}.")]
CITY_ATTRS = ["postal code", "area code", "district number", "registry number", "harbour number",
              "station number", "tram line number", "council number", "census number", "museum number",
              "fire station number", "market licence number", "bridge number", "railway code", "water board code"]
# One plain sentence per fact, ending with the value. Variants with extra words ("For the record, ...",
# "..., as the records show.") drew most wrong answers (their values copied for other questions), and
# attributes that read as ordinary words ("lucky number", "garage code") were answered from world knowledge.
PERSON_CODE = ["{p}'s {a} is {v}."]
CITY_CODE = ["The {a} of {c} is {v}."]


GENERIC = ["the town", "the old town", "the market town", "the village", "the district", "the valley town"]
GENERIC2 = ["the next village", "the village to the north", "the town across the river", "the old port",
            "the hill town", "the coastal village", "the southern district", "the mining town"]


def filler_sentence(rng, home):
    """A sentence of filler prose about the document's place `home` (or a nameless place nearby)."""
    t = rng.choice(FILLER)
    r1 = home if rng.random() < 0.35 else rng.choice(GENERIC)
    r2 = rng.choice(GENERIC2)
    g1, g2 = rng.sample(GOODS, 2)
    w = rng.choice(ADJ_WEATHER)
    s = t.format(region=r1, region2=r2, w=w, season=rng.choice(SEASONS), feature=rng.choice(FEATURES),
                 year=rng.randint(1450, 1950), group=rng.choice(PEOPLE_GROUPS), good=g1, good2=g2,
                 building=rng.choice(BUILDINGS))
    return s[0].upper() + s[1:]


def est_tokens(s, cpt=4.3):
    # SmolLM2's tokenizer: ~4.3 chars per token on this prose, ~3.6 on the Python reference (TEXT_CPT);
    # each digit is one token.
    digits = sum(ch.isdigit() for ch in s)
    return (len(s) - digits) / cpt + digits


TEXT_CPT = 3.6


# ---------------------------------------------------------------------------------------------------
# gen


def build_corpus(rng, n_docs, lo=128, hi=512, skew=4.0, facts_per_doc=1.25):
    taken = set()
    # facts in units of 5: a chain (residence + the city's code: 2 facts), 2 person codes, 1 city code
    units = max(1, int(round(facts_per_doc * n_docs / 5)))
    n_chains = units             # person -> city -> code chains
    n_pcode = 2 * units          # person code facts
    n_city_only = units          # city codes without a resident
    people = make_names(rng, n_chains + n_pcode, PERSONS, taken,
                        [p + " " for p in PERSONS], [x + y for x in SUR_A for y in SUR_B])
    cities = make_names(rng, n_chains + n_city_only, CITIES, taken, SUR_A, ["no", "dra", "rel", "ova", "eth"])
    regions = make_names(rng, max(40, n_docs), [], taken, REGION_A, REGION_B)
    values = rng.sample(range(10000, 100000), n_chains + n_pcode + n_city_only)
    facts = [[] for _ in range(n_docs)]  # per doc: list of (relation, subject, value, sentence)
    info = {"person_code": [], "person_city": [], "city_code": [], "chains": []}
    vi = 0

    def put(doc, rel, subj, val, tmpl):
        attr = {"person_code": PERSON_ATTRS, "city_code": CITY_ATTRS, "person_city": PERSON_CITY}[rel]
        attr = rng.choice(attr)
        if rel == "person_city":
            attr, tmpl = attr
            s = tmpl.format(p=subj, c=val)
        else:
            s = rng.choice(tmpl).format(p=subj, c=subj, v=val, a=attr)
        facts[doc].append((rel, subj, val, s))
        info[rel].append({"doc": doc, "subject": subj, "value": str(val), "attr": attr})

    # documents dealt round-robin from shuffled rounds, so facts spread evenly over documents
    deck = []

    def deal(avoid=None):
        if not deck:
            r = list(range(n_docs))
            rng.shuffle(r)
            deck.extend(r)
        for i, d in enumerate(deck):
            if d != avoid:
                return deck.pop(i)
        return next(d for d in range(n_docs) if d != avoid)

    # chains: residence in doc A, the city's code in doc B != A
    for k in range(n_chains):
        a = deal()
        b = deal(avoid=a)
        p, c, v = people[k], cities[k], values[vi]
        vi += 1
        put(a, "person_city", p, c, PERSON_CITY)
        put(b, "city_code", c, v, CITY_CODE)
        info["chains"].append({"person": p, "city": c, "value": str(v), "doc_a": a, "doc_b": b,
                               "attr": info["city_code"][-1]["attr"], "verb": info["person_city"][-1]["attr"]})
    for k in range(n_pcode):
        put(deal(), "person_code", people[n_chains + k], values[vi], PERSON_CODE)
        vi += 1
    for k in range(n_city_only):
        put(deal(), "city_code", cities[n_chains + k], values[vi], CITY_CODE)
        vi += 1

    docs = []
    for d in range(n_docs):
        # target length in tokens: skewed towards the short end of [128, 512]
        target = lo + int((hi - lo) * rng.random() ** skew)
        title_region = regions[d % len(regions)]
        title = rng.choice(["Notes on {r}", "A short account of {r}", "Travel notes: {r}",
                            "{r} and its neighbours", "Records from {r}", "About {r}"]).format(r=title_region)
        sents = [filler_sentence(rng, title_region)]
        body_facts = [f[3] for f in facts[d]]
        rng.shuffle(body_facts)
        while est_tokens(title + " ".join(sents + body_facts)) < target:
            sents.append(filler_sentence(rng, title_region))
        # interleave facts at random places (never the very first sentence)
        for fs in body_facts:
            sents.insert(rng.randint(1, len(sents)), fs)
        # two paragraphs
        cut = len(sents) // 2
        text = title + "\n" + " ".join(sents[:cut]) + "\n" + " ".join(sents[cut:]) + "\n\n"
        docs.append(text)
    return docs, info


def place(rng, needed, others, n, pos, bridge=None):
    """Return (doc list of corpus ids, needle index, bridge index)."""
    if pos == "first":
        idx = 0
    elif pos == "last":
        idx = n - 1
    else:
        idx = rng.choice(sorted({(n - 1) // 2, n // 2}))
    rest = list(others) + ([bridge] if bridge is not None else [])
    rng.shuffle(rest)
    out = rest[:idx] + [needed] + rest[idx:]
    return out, idx, (out.index(bridge) if bridge is not None else None)


def qa_cases(rng, docs, info, n_q, k, two_hop_frac):
    n_docs = len(docs)
    n_two = int(round(n_q * two_hop_frac))
    n_single = n_q - n_two
    rels = ["person_code", "person_city", "city_code"]
    plan = [("single", rels[i % 3]) for i in range(n_single)] + [("two_hop", "person_city_code")] * n_two
    rng.shuffle(plan)
    pos_counter = {"single": 0, "two_hop": 0}
    pos_start = {"single": rng.randrange(3), "two_hop": rng.randrange(3)}
    pools = {r: list(info[r]) for r in rels}
    pools["chains"] = list(info["chains"])
    for v in pools.values():
        rng.shuffle(v)
    used = {r: 0 for r in pools}
    cases = []
    for qi, (kind, rel) in enumerate(plan):
        pos = POSITIONS[(pos_start[kind] + pos_counter[kind]) % 3]
        pos_counter[kind] += 1
        key = "chains" if kind == "two_hop" else rel
        pool = pools[key]
        f = pool[used[key] % len(pool)]
        used[key] += 1
        if kind == "single":
            needed, bridge = f["doc"], None
            subj, ans = f["subject"], f["value"]
            if rel == "person_code":
                q = "What is %s's %s?" % (subj, f["attr"])
                lead = "%s's %s is" % (subj, f["attr"])
            elif rel == "city_code":
                q = "What is the %s of %s?" % (f["attr"], subj)
                lead = "The %s of %s is" % (f["attr"], subj)
            else:
                verb = f["attr"]
                q = "In which city %s %s?" % ({"lives in": "does %s live", "works in": "does %s work",
                                               "teaches in": "does %s teach", "grew up in": "did %s grow up",
                                               "studied in": "did %s study", "retired to": "did %s retire",
                                               "was born in": "was %s born", "was married in": "was %s married"}
                                              [verb] % subj, "to" if verb == "retired to" else "")
                q = q.replace(" ?", "?")
                lead = "%s %s the city of" % (subj, verb)
        else:
            needed, bridge = f["doc_b"], f["doc_a"]
            subj, ans = f["person"], f["value"]
            clause = {"lives in": "%s lives", "works in": "%s works", "teaches in": "%s teaches",
                      "grew up in": "%s grew up", "studied in": "%s studied", "retired to": "%s retired to",
                      "was born in": "%s was born", "was married in": "%s was married"}[f["verb"]] % subj
            q = "What is the %s of the city where %s?" % (f["attr"], clause)
            lead = "The %s of the city where %s is" % (f["attr"], clause)
        excl = {needed} | ({bridge} if bridge is not None else set())
        forced = []
        if kind == "two_hop":
            # a distractor with the same city attribute (another city), so that the attribute alone does
            # not give the answer away: the question needs the residence fact (hop 1)
            same = sorted({g["doc"] for g in info["city_code"]
                           if g["attr"] == f["attr"] and g["subject"] != f["city"] and g["doc"] not in excl})
            if same and k > len(excl):
                forced = [rng.choice(same)]
        n_other = k - len(excl) - len(forced)
        others = forced + rng.sample([d for d in range(n_docs) if d not in excl and d not in forced], n_other)
        ids, ni, bi = place(rng, needed, others, k, pos, bridge)
        c = {"id": "q%04d" % qi, "kind": kind, "relation": rel, "needle_pos": pos, "needle_index": ni,
             "prefix": PREFIX, "docs": [docs[i] for i in ids], "doc_ids": ids,
             "query": Q_HEAD + q + Q_TAIL + lead, "answer": ans}
        if bi is not None:
            c["bridge_index"] = bi
        if forced:
            c["decoy_index"] = ids.index(forced[0])
        cases.append(c)
    return cases


DEFAULT_TEXT_PAGES = ["functions.html", "stdtypes.html", "json.html", "re.html", "os.html",
                      "collections.html", "itertools.html", "pathlib.html", "argparse.html", "datetime.html"]


def text_chunks(rng, pages, doc_dir=None):
    """Per page: list of chunks (each ~200-400 tokens, whole lines) and the page's remaining lines."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import python_doc_text as pdt  # noqa: E402
    d = pdt.find_doc_dir(doc_dir)
    if d is None:
        raise SystemExit("Python library reference not found (apt-get install python3-doc)")
    out = []
    for p in pages:
        path = os.path.join(d, p)
        if not os.path.exists(path):
            print("docs_fidelity: skipping missing page %s" % p, file=sys.stderr)
            continue
        lines = pdt.page_text(path).split("\n")
        chunks, cur, target = [], [], 200 + rng.randrange(201)
        for i, line in enumerate(lines):
            cur.append(line)
            if est_tokens("\n".join(cur), TEXT_CPT) >= target:
                chunks.append(("\n".join(cur), i + 1))
                cur, target = [], 200 + rng.randrange(201)
        out.append((p, chunks, lines))
    return out


def continuation_after(lines, start, tokens=64):
    """The ~`tokens`-token passage starting at line `start` (cut at a word boundary)."""
    text = "\n".join(lines[start:])
    text = text.lstrip("\n")
    words = re.split(r"(\s+)", text)
    out = ""
    for w in words:
        if est_tokens(out + w, TEXT_CPT) > tokens and out.strip():
            break
        out += w
    return out.rstrip()


def text_cases(rng, n, k, first_id, pages):
    per_page = text_chunks(rng, pages)
    # chunk ids, assigned in source order after the fact corpus
    ids, nid = {}, first_id
    for p, chunks, _ in per_page:
        for j in range(len(chunks)):
            ids[(p, j)] = nid
            nid += 1
    windows = []
    for pi, (p, chunks, lines) in enumerate(per_page):
        for j in range(0, len(chunks) - k):  # a chunk must follow: the continuation comes from it
            windows.append((pi, j))
    if not windows:
        raise SystemExit("no page long enough for %d chunks" % k)
    # spread windows over pages; overlapping windows share chunks (reuse)
    by_page = {}
    for w in windows:
        by_page.setdefault(w[0], []).append(w)
    for v in by_page.values():
        rng.shuffle(v)
    pick, pages_cycle = [], sorted(by_page)
    i = 0
    while len(pick) < n and any(by_page.values()):
        p = pages_cycle[i % len(pages_cycle)]
        if by_page[p]:
            pick.append(by_page[p].pop())
        i += 1
    cases = []
    for ci, (pi, j) in enumerate(pick):
        p, chunks, lines = per_page[pi]
        docs = [chunks[j + t][0] + "\n\n" for t in range(k)]
        cont = continuation_after(lines, chunks[j + k - 1][1])
        cases.append({"id": "t%04d" % ci, "kind": "text", "relation": "continuation",
                      "needle_pos": POSITIONS[ci % 3], "needle_index": k - 1, "page": p,
                      "prefix": PREFIX, "docs": docs, "doc_ids": [ids[(p, j + t)] for t in range(k)],
                      "query": cont, "answer": "", "continuation": True})
    return cases


def cmd_gen(a):
    rng = random.Random(a.seed)
    lo, hi = (int(x) for x in a.doc_tokens.split(","))
    docs, info = build_corpus(rng, a.corpus_docs, lo, hi, a.doc_skew, a.facts_per_doc)
    if a.docs_per_question > a.corpus_docs:
        raise SystemExit("--docs-per-question larger than --corpus-docs")
    cases = qa_cases(rng, docs, info, a.questions, a.docs_per_question, a.two_hop_frac)
    if a.real_text:
        pages = a.text_pages.split(",") if a.text_pages else DEFAULT_TEXT_PAGES
        cases += text_cases(random.Random(a.seed * 7919 + 1), a.real_text, a.docs_per_question,
                            a.corpus_docs, pages)
    with open(a.out, "w", encoding="utf-8") as f:
        for c in cases:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    est = [est_tokens(d) for d in docs]
    kinds = {}
    for c in cases:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    print("wrote %d cases to %s (%s); corpus %d docs, ~%d-%d tokens each (estimate, median %d)"
          % (len(cases), a.out, ", ".join("%s %d" % kv for kv in sorted(kinds.items())), len(docs),
             min(est), max(est), statistics.median(est)), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# calibrate: the sequential reference through larder serve


def is_em(output, answer):
    return 1 if output.replace(" ", "").startswith(answer.replace(" ", "")) else 0


def find_model():
    try:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "models.py"), "--path", "smollm2"],
                           capture_output=True, text=True, timeout=30)
        p = r.stdout.strip().splitlines()
        if r.returncode == 0 and p and os.path.exists(p[-1]):
            return p[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    p = os.path.expanduser("~/.cache/larder/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


def tokenize_pieces(larder, model, pieces):
    uniq = sorted(set(pieces))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(uniq, f)
        path = f.name
    try:
        r = subprocess.run([larder, "tokenize", "-m", model, "--parse-special", "--no-bos", "--json-batch", path],
                           capture_output=True, text=True, check=True)
    finally:
        os.unlink(path)
    return dict(zip(uniq, json.loads(r.stdout)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def cmd_calibrate(a):
    larder = a.larder or os.path.join(ROOT, "build", "bin", "larder")
    model = a.model or find_model()
    if not model:
        raise SystemExit("SmolLM2-135M-Instruct not cached (scripts/models smollm2)")
    cases = [json.loads(l) for l in open(a.cases, encoding="utf-8")]
    kinds = set(a.kinds.split(","))
    cases = [c for c in cases if c["kind"] in kinds]
    cases = cases[a.skip:]
    if a.limit:
        cases = cases[:a.limit]
    all_cases = cases
    pieces = []
    for c in cases:
        pieces += [c["prefix"], c["query"]] + c["docs"]
    tok = tokenize_pieces(larder, model, pieces)
    doc_lens = {}
    for c in cases:
        for i, d in zip(c["doc_ids"], c["docs"]):
            doc_lens[i] = len(tok[d])
    if all(c["kind"] == "text" for c in cases):
        a.tokens_only = True
    proc = None
    url = a.url
    if a.tokens_only:
        cases = []
    elif not url:
        port = free_port()
        proc = subprocess.Popen([larder, "serve", "-m", model, "--port", str(port), "-t", str(a.threads),
                                 "--parallel", "1", "-c", "4096"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = "http://127.0.0.1:%d" % port
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("larder serve exited")
                time.sleep(0.2)
    out = open(a.out, "w") if a.out else None
    res = []
    try:
        for n, c in enumerate(cases):
            ids = tok[c["prefix"]] + [t for d in c["docs"] for t in tok[d]] + tok[c["query"]]
            t0 = time.time()
            r = post(url + "/v1/completions", {"prompt": ids, "max_tokens": a.n, "temperature": 0})
            dt = time.time() - t0
            text = r["choices"][0]["text"]
            em = is_em(text, c["answer"]) if c["kind"] != "text" else None
            row = {"id": c["id"], "kind": c["kind"], "relation": c.get("relation"), "needle_pos": c["needle_pos"],
                   "method": "sequential", "em": em, "output": text, "answer": c["answer"],
                   "prompt_tokens": len(ids), "ttft_s": None, "wall_s": round(dt, 3)}
            res.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            if a.verbose:
                print("%s %-8s %-16s %-6s %4d tok %5.1fs em=%s  %r -> %r" % (
                    c["id"], c["kind"], c.get("relation"), c["needle_pos"], len(ids), dt, em, c["answer"], text),
                    file=sys.stderr)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if out:
            out.close()
    qa = [r for r in res if r["em"] is not None]

    def line(label, rows):
        if rows:
            print("%-28s %3d/%3d = %5.1f%%" % (label, sum(r["em"] for r in rows), len(rows),
                                               100.0 * sum(r["em"] for r in rows) / len(rows)))
    if not a.tokens_only:
        print("sequential exact match (%s, %d threads, max_tokens %d):" % (os.path.basename(model), a.threads, a.n))
    line("overall", qa)
    for key in ("kind", "relation", "needle_pos"):
        for v in sorted({r[key] for r in qa}):
            line("  %s=%s" % (key, v), [r for r in qa if r[key] == v])
    L = sorted(doc_lens.values())
    if len({c["kind"] == "text" for c in all_cases}) > 1:
        print("(doc tokens below: fact and text documents together)")
    if L:
        print("doc tokens: n=%d min %d p25 %d median %d p75 %d max %d mean %.0f" % (
            len(L), L[0], L[len(L) // 4], L[len(L) // 2], L[3 * len(L) // 4], L[-1], sum(L) / len(L)))
    if a.tokens_only:
        P = sorted(len(tok[c["prefix"]]) + sum(len(tok[d]) for d in c["docs"]) + len(tok[c["query"]])
                   for c in all_cases)
        Q = sorted(len(tok[c["query"]]) for c in all_cases)
        print("query tokens: min %d median %d max %d" % (Q[0], Q[len(Q) // 2], Q[-1]))
    else:
        P = sorted(r["prompt_tokens"] for r in res)
    if P:
        print("prompt tokens: min %d median %d max %d" % (P[0], P[len(P) // 2], P[-1]))


# ---------------------------------------------------------------------------------------------------
# report


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec="%.3f"):
    return "–" if x is None else spec % x


def family(method):
    m = re.match(r"^(.*?)-(\d+(?:\.\d+)?)$", method)
    return m.group(1) if m else method


def summarize(rows, seq_rows):
    """Stats for one method's rows; seq_rows: the sequential rows of the same cases (by id)."""
    qa = [r for r in rows if r.get("em") is not None and r.get("kind") != "text"]
    text = [r for r in rows if r.get("kind") == "text"]
    em = mean([r["em"] for r in qa])
    seq_qa = [seq_rows[r["id"]] for r in qa if r["id"] in seq_rows and seq_rows[r["id"]].get("em") is not None]
    seq_em = mean([r["em"] for r in seq_qa])
    ratio = em / seq_em if em is not None and seq_em else None
    ttft = median([r.get("ttft_s") for r in rows])
    seq_ttft = median([seq_rows[r["id"]].get("ttft_s") for r in rows if r["id"] in seq_rows])
    speed = seq_ttft / ttft if ttft and seq_ttft else None
    logs = []
    for r in text:
        s = seq_rows.get(r["id"])
        if s and r.get("ppl") and s.get("ppl"):
            logs.append(math.log(r["ppl"] / s["ppl"]))
    return {"n": len(rows), "n_qa": len(qa), "em": em, "em_ratio": ratio,
            "kl_first": mean([r.get("kl_first") for r in qa]), "kl_mean32": mean([r.get("kl_mean32") for r in qa]),
            "top1": mean([r.get("top1_agree") for r in qa]), "recompute": mean([r.get("recompute") for r in rows]),
            "ttft": ttft, "speedup": speed, "ppl_ratio": math.exp(sum(logs) / len(logs)) if logs else None,
            "text_kl32": mean([r.get("kl_mean32") for r in text])}


COLS = [("n", "n", "%d"), ("EM", "em", "%.3f"), ("EM/seq", "em_ratio", "%.3f"), ("KL@ans", "kl_first", "%.4f"),
        ("KL32", "kl_mean32", "%.4f"), ("top-1", "top1", "%.3f"), ("recompute", "recompute", "%.3f"),
        ("TTFT med (s)", "ttft", "%.4f"), ("speed-up", "speedup", "%.2f"), ("PPL ratio (text)", "ppl_ratio", "%.4f"),
        ("KL32 (text)", "text_kl32", "%.4f")]


def method_order(methods):
    def key(m):
        f = family(m)
        base = ["sequential", "parallel", "ape", "reposition", "blend", "link", "epic", "focus"]
        num = re.match(r"^.*-(\d+(?:\.\d+)?)$", m)
        return (base.index(f) if f in base else len(base), f, float(num.group(1)) if num else -1, m)
    return sorted(methods, key=key)


def table(rows_by_method, seq_rows, methods):
    out = ["| method | " + " | ".join(c[0] for c in COLS) + " |",
           "|---|" + "|".join("---:" for _ in COLS) + "|"]
    stats = {}
    for m in methods:
        rows = rows_by_method.get(m, [])
        if not rows:
            continue
        s = summarize(rows, seq_rows)
        stats[m] = s
        out.append("| %s | " % m + " | ".join(fmt(s[k], sp) for _, k, sp in COLS) + " |")
    return out, stats


def bootstrap(best_rows, other_rows, field, B, rng):
    a = {r["id"]: r.get(field) for r in best_rows if r.get(field) is not None}
    b = {r["id"]: r.get(field) for r in other_rows if r.get(field) is not None}
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    d = [a[i] - b[i] for i in ids]
    n = len(d)
    est = sum(d) / n
    sims = []
    for _ in range(B):
        s = 0.0
        for _ in range(n):
            s += d[rng.randrange(n)]
        sims.append(s / n)
    sims.sort()
    lo = sims[int(0.025 * (B - 1))]
    hi = sims[int(math.ceil(0.975 * (B - 1)))]
    return est, lo, hi, n


def svg_plot(stats, path):
    W, H = 980, 430
    panels = [("EM ratio to sequential", "em_ratio"), ("mean KL at the answer position", "kl_first")]
    pts = {m: s for m, s in stats.items() if s.get("recompute") is not None}
    fams = sorted({family(m) for m in pts})
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
    color = {f: palette[i % len(palette)] for i, f in enumerate(fams)}
    xmax = max([1.0] + [s["recompute"] for s in pts.values()])
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
         'font-family="sans-serif" font-size="11">' % (W, H, W, H),
         '<rect width="100%" height="100%" fill="white"/>']
    pw, ph, top = 400, 320, 50
    for pi, (title, key) in enumerate(panels):
        x0 = 70 + pi * 490
        vals = [s[key] for s in pts.values() if s.get(key) is not None]
        if key == "em_ratio":
            ylo, yhi = min([0.0] + vals), max([1.05] + [v * 1.05 for v in vals])
        else:
            ylo, yhi = 0.0, (max(vals) * 1.1 if vals and max(vals) > 0 else 1.0)

        def X(x):
            return x0 + pw * x / xmax

        def Y(y):
            return top + ph - ph * (y - ylo) / (yhi - ylo)
        o.append('<text x="%d" y="%d" font-size="13" font-weight="bold">%s vs recompute fraction</text>'
                 % (x0, top - 18, title))
        o.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (x0, top, pw, ph))
        for i in range(6):
            xv = xmax * i / 5
            o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' % (X(xv), top, X(xv), top + ph))
            o.append('<text x="%.1f" y="%d" text-anchor="middle">%.2f</text>' % (X(xv), top + ph + 15, xv))
            yv = ylo + (yhi - ylo) * i / 5
            o.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>' % (x0, Y(yv), x0 + pw, Y(yv)))
            o.append('<text x="%d" y="%.1f" text-anchor="end">%.3g</text>' % (x0 - 5, Y(yv) + 4, yv))
        o.append('<text x="%d" y="%d" text-anchor="middle">recompute fraction</text>' % (x0 + pw // 2, top + ph + 32))
        if key == "em_ratio":
            o.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#999" stroke-dasharray="4 3"/>'
                     % (x0, Y(1.0), x0 + pw, Y(1.0)))
        for f in fams:
            ms = sorted([m for m in pts if family(m) == f and pts[m].get(key) is not None],
                        key=lambda m: pts[m]["recompute"])
            if len(ms) > 1:
                o.append('<polyline fill="none" stroke="%s" stroke-opacity="0.5" points="%s"/>' % (
                    color[f], " ".join("%.1f,%.1f" % (X(pts[m]["recompute"]), Y(pts[m][key])) for m in ms)))
            for m in ms:
                x, y = X(pts[m]["recompute"]), Y(pts[m][key])
                o.append('<circle cx="%.1f" cy="%.1f" r="4" fill="%s"><title>%s: %.4f</title></circle>'
                         % (x, y, color[f], m, pts[m][key]))
                if x > x0 + pw - 8 * len(m):  # label left of points near the right edge
                    o.append('<text x="%.1f" y="%.1f" fill="%s" text-anchor="end">%s</text>'
                             % (x - 6, y - 5, color[f], m))
                else:
                    o.append('<text x="%.1f" y="%.1f" fill="%s">%s</text>' % (x + 6, y - 5, color[f], m))
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def cmd_report(a):
    rows = [json.loads(l) for l in open(a.results, encoding="utf-8") if l.strip()]
    by_m = {}
    for r in rows:
        by_m.setdefault(r["method"], []).append(r)
    if "sequential" not in by_m:
        raise SystemExit("no method 'sequential' rows (the reference)")
    seq = {r["id"]: r for r in by_m["sequential"]}
    methods = method_order(by_m)
    md = ["# Per-document KV reuse: fidelity to sequential prefill", "",
          "%s: %d result lines, %d cases, %d methods." % (os.path.basename(a.results), len(rows), len(seq),
                                                         len(methods)),
          "EM over QA cases; KL columns over QA cases (teacher-forced on the sequential greedy answer); "
          "speed-up = median sequential TTFT / median TTFT; PPL ratio = geometric mean of paired per-case "
          "ratios on text cases.", "", "## All cases", ""]
    t, stats = table(by_m, seq, methods)
    md += t
    for key, title in (("kind", "By kind"), ("needle_pos", "By needle position")):
        order = list(POSITIONS) + ["single", "two_hop", "text"]
        vals = sorted({r.get(key) for r in rows if r.get(key) is not None},
                      key=lambda v: (order.index(v) if v in order else 9, v))
        for v in vals:
            sub = {m: [r for r in rs if r.get(key) == v] for m, rs in by_m.items()}
            md += ["", "## %s: %s" % (title, v), ""]
            md += table(sub, seq, methods)[0]
    # best method
    best = a.best
    if best not in by_m:
        cands = [m for m in methods if family(m) == best]
        if cands:
            best = max(cands, key=lambda m: (stats[m]["em"] or 0, -(stats[m]["kl_first"] or 0)))
    md += ["", "## Paired bootstrap 95%% intervals: %s minus each method (%d resamples of cases)" % (best, a.boot), ""]
    if best not in by_m:
        md.append("(no method %r in the results)" % a.best)
    else:
        rng = random.Random(a.seed)
        md += ["| other | n | ΔEM | 95% CI | ΔKL@ans | 95% CI |", "|---|---:|---:|---|---:|---|"]
        best_qa = [r for r in by_m[best] if r.get("kind") != "text"]
        for m in methods:
            if m == best:
                continue
            oth = [r for r in by_m[m] if r.get("kind") != "text"]
            e = bootstrap(best_qa, oth, "em", a.boot, rng)
            k = bootstrap(best_qa, oth, "kl_first", a.boot, rng)
            n = e[3] if e else (k[3] if k else 0)
            md.append("| %s | %d | %s | %s | %s | %s |" % (
                m, n, fmt(e and e[0], "%+.3f"), "[%+.3f, %+.3f]" % (e[1], e[2]) if e else "–",
                fmt(k and k[0], "%+.4f"), "[%+.4f, %+.4f]" % (k[1], k[2]) if k else "–"))
    text = "\n".join(md) + "\n"
    sys.stdout.write(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    if a.svg:
        svg_plot(stats, a.svg)


# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen", help="write the cases")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--questions", type=int, default=300)
    g.add_argument("--docs-per-question", type=int, default=8)
    g.add_argument("--corpus-docs", type=int, default=64)
    g.add_argument("--two-hop-frac", type=float, default=0.1,
                   help="share of two_hop questions (SmolLM2-135M answers ~30%% of them; see the docstring)")
    g.add_argument("--doc-tokens", default="128,512", help="MIN,MAX target document length (tokens)")
    g.add_argument("--doc-skew", type=float, default=5.0,
                   help="length = MIN + (MAX-MIN) * u**skew, u uniform: larger skews towards MIN")
    g.add_argument("--facts-per-doc", type=float, default=1.25, help="mean facts per corpus document")
    g.add_argument("--real-text", type=int, default=0)
    g.add_argument("--text-pages", help="comma-separated page files (default: %s)" % ",".join(DEFAULT_TEXT_PAGES))
    r = sub.add_parser("report", help="tables, bootstrap intervals and plot from results")
    r.add_argument("--results", required=True)
    r.add_argument("--md")
    r.add_argument("--svg")
    r.add_argument("--boot", type=int, default=2000)
    r.add_argument("--best", default="focus")
    r.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("calibrate", help="sequential EM through larder serve")
    c.add_argument("--cases", required=True)
    c.add_argument("--limit", type=int, default=60, help="first N selected cases (0: all)")
    c.add_argument("--skip", type=int, default=0, help="skip the first N selected cases")
    c.add_argument("--kinds", default="single,two_hop")
    c.add_argument("--model")
    c.add_argument("--larder")
    c.add_argument("--url")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("-n", type=int, default=8)
    c.add_argument("--out")
    c.add_argument("--tokens-only", action="store_true", help="only the token lengths (no server)")
    c.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    {"gen": cmd_gen, "report": cmd_report, "calibrate": cmd_calibrate}[a.cmd](a)


if __name__ == "__main__":
    main()
