"""The embedded Chinese→English corpus: a seeded grammar over a 300-word lexicon, and what its test split holds out.

`generate_corpus(seed)` writes sentences from a small grammar over the lexicon in
`labkit.core.lexicon`: pronouns and names with verb agreement, numerals with measure
words, tense and aspect (了/会/正在), negation (不/没), yes/no and wh-questions,
locations, comparatives, possessives and two-clause sentences. Every Chinese
sentence has exactly one English reference, so BLEU measures the model, not the
ambiguity of the data.

The test split holds out word combinations (verb+object, adjective+noun) so a
high test BLEU means the model composes, not that it memorised. The generator's
bookkeeping tracks the combinations of objects and places but not those inside
subjects or comparisons, so some held-out pairs reached training too;
`unseen_pairs` measures on the text itself what the test split really holds that
training lacks (22 % of the committed test sentences).

    splits = generate_corpus(seed=0)      # {"train": [Pair, ...], "dev": [...], "test": [...]}

Left out: a second reference per sentence, dialogue, and vocabulary beyond the
lexicon. Real data comes in through labkit.core.data (`read_tsv`, `read_parallel`,
`load_sacrebleu_testset`).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from labkit.core import lexicon as lx
from labkit.core.data import SPLITS, Pair

# --------------------------------------------------------------------------- lexicon


@dataclass(frozen=True)
class Noun:
    zh: str
    mw: str  # measure word: 三本书 -> 本
    sg: str
    pl: str
    cls: str  # read | watch | food | animal | thing | person | drink


@dataclass(frozen=True)
class Verb:
    zh: str
    base: str
    objects: tuple[str, ...]  # noun classes it takes; () = intransitive
    past_form: str
    ing_form: str


@dataclass(frozen=True)
class Adjective:
    attr: str  # before a noun: 红车, 漂亮的花
    pred: str  # after 很: 很漂亮
    en: str
    comparative: str
    classes: tuple[str, ...]


def _plural(word: str) -> str:
    """Regular English plural: 'box' -> 'boxes', 'story' -> 'stories', 'cat' -> 'cats'."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _inflect_first(phrase: str, fn) -> str:
    """Apply `fn` to the first word: ('look for', past) -> 'looked for'."""
    head, _, rest = phrase.partition(" ")
    return fn(head) + (" " + rest if rest else "")


def _third(word: str) -> str:
    if word == "have":
        return "has"
    if word.endswith(("s", "x", "ch", "sh", "o")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _past(word: str) -> str:
    if word.endswith("e"):
        return word + "d"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ied"
    return word + "ed"


def _ing(word: str) -> str:
    if word.endswith("e") and not word.endswith("ee"):
        return word[:-1] + "ing"
    return word + "ing"


def _comparative(word: str) -> str:
    if word.endswith("e"):
        return word + "r"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ier"
    return word + "er"


def _load_nouns() -> list[Noun]:
    return [Noun(zh, mw, sg, pl or _plural(sg), cls) for zh, mw, sg, pl, cls in lx.rows(lx.NOUNS)]


def _load_verbs() -> list[Verb]:
    verbs = []
    for zh, base, objs, past, ing in lx.rows(lx.VERBS):
        verbs.append(Verb(zh, base, tuple(o for o in objs.split(",") if o),
                          past or _inflect_first(base, _past), ing or _inflect_first(base, _ing)))
    return verbs


def _load_adjectives() -> list[Adjective]:
    return [Adjective(attr, pred, en, comp or _comparative(en), tuple(classes.split(",")))
            for attr, pred, en, comp, classes in lx.rows(lx.ADJECTIVES)]


NOUNS = _load_nouns()
VERBS = _load_verbs()
ADJECTIVES = _load_adjectives()
DRINKS = lx.rows(lx.DRINKS)
CONTAINERS = lx.rows(lx.CONTAINERS)
PLACES = lx.rows(lx.PLACES)
NAMES = lx.rows(lx.NAMES)
TIMES = lx.rows(lx.TIMES)
POSITIONS = lx.rows(lx.POSITIONS)
PRONOUNS = lx.rows(lx.PRONOUNS)
NUMERALS = [(zh, int(n)) for zh, n in lx.rows(lx.NUMERALS)]
LANDMARKS = [n for n in NOUNS if n.cls == "thing" and n.sg in {
    "table", "chair", "bed", "door", "window", "box", "bag", "sofa", "fridge", "house",
    "car", "basket", "lamp", "computer"}]


def content_words() -> set[str]:
    """Every Chinese content word the grammar can emit (nouns, verbs, adjectives, places, ...)."""
    words = {n.zh for n in NOUNS} | {v.zh for v in VERBS} | {a.pred for a in ADJECTIVES}
    for table in (DRINKS, PLACES, NAMES, TIMES):
        words |= {row[0] for row in table}
    return words


# --------------------------------------------------------------------------- phrases


@dataclass(frozen=True)
class NP:
    """A rendered noun phrase with what English agreement needs to know."""

    zh: str
    en: str  # subject form
    obj: str  # object form ('him' for 他); equals `en` for non-pronouns
    person: int = 3
    plural: bool = False
    noun: Noun | None = None
    combos: frozenset[str] = frozenset()


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _combo(head: str, dep: str) -> str:
    return f"{head}+{dep}"


class Grammar:
    """Sentence generators sharing one seeded RNG; each returns (zh, en, combos)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    # ---- noun phrases

    def pronoun(self) -> NP:
        zh, en, obj, _poss, person, number = self.pick(PRONOUNS)
        return NP(zh, en, obj, int(person), number == "pl")

    def name(self) -> NP:
        zh, en = self.pick(NAMES)
        return NP(zh, en, en)

    def owner(self) -> tuple[str, str]:
        """A possessor: ('我的', 'my') or ('小明的', "Xiaoming's")."""
        if self.rng.random() < 0.6:
            zh, _en, _obj, poss, _p, _n = self.pick(PRONOUNS)
            return zh + "的", poss
        zh, en = self.pick(NAMES)
        return zh + "的", en + "'s"

    def adjective_for(self, noun: Noun) -> Adjective | None:
        fitting = [a for a in ADJECTIVES if noun.cls in a.classes]
        return self.pick(fitting) if fitting else None

    def noun_phrase(self, classes: Iterable[str], role: str) -> NP:
        """A determiner + optional adjective + noun; role 'subj' makes bare nouns definite."""
        noun = self.pick([n for n in NOUNS if n.cls in set(classes)])
        adj = self.adjective_for(noun) if self.rng.random() < 0.3 else None
        zh_n = (adj.attr if adj else "") + noun.zh
        en_sg = (adj.en + " " if adj else "") + noun.sg
        en_pl = (adj.en + " " if adj else "") + noun.pl
        combos = frozenset({_combo(adj.en, noun.sg)} if adj else ())
        kind = self.pick(["bare", "bare", "dem", "num", "num", "poss"])
        if kind == "bare" and role == "subj":
            return NP(zh_n, "the " + en_sg, "the " + en_sg, noun=noun, combos=combos)
        if kind == "bare":
            return NP(zh_n, en_pl, en_pl, plural=True, noun=noun, combos=combos)
        if kind == "dem":
            near = self.rng.random() < 0.5
            if self.rng.random() < 0.3:
                zh, en = ("这些", "these") if near else ("那些", "those")
                return NP(zh + zh_n, f"{en} {en_pl}", f"{en} {en_pl}", plural=True, noun=noun, combos=combos)
            zh, en = ("这", "this") if near else ("那", "that")
            return NP(zh + noun.mw + zh_n, f"{en} {en_sg}", f"{en} {en_sg}", noun=noun, combos=combos)
        if kind == "poss":
            zh, en = self.owner()
            return NP(zh + zh_n, f"{en} {en_sg}", f"{en} {en_sg}", noun=noun, combos=combos)
        zh_num, n = self.pick(NUMERALS)
        if n == 1:
            phrase = f"{_article(en_sg)} {en_sg}"
            return NP(zh_num + noun.mw + zh_n, phrase, phrase, noun=noun, combos=combos)
        phrase = f"{lx.NUMBER_WORDS[n]} {en_pl}"
        return NP(zh_num + noun.mw + zh_n, phrase, phrase, plural=True, noun=noun, combos=combos)

    def drink_phrase(self) -> NP:
        zh, en = self.pick(DRINKS)
        if self.rng.random() < 0.4:
            return NP(zh, en, en)
        c_zh, c_sg, c_pl = self.pick(CONTAINERS)
        zh_num, n = self.pick(NUMERALS[:6])
        if n == 1:
            phrase = f"a {c_sg} of {en}"
        else:
            phrase = f"{lx.NUMBER_WORDS[n]} {c_pl} of {en}"
        return NP(zh_num + c_zh + zh, phrase, phrase, plural=n > 1)

    def person(self, role: str) -> NP:
        r = self.rng.random()
        if r < 0.45:
            return self.pronoun()
        if r < 0.7:
            return self.name()
        return self.noun_phrase(["person"], role)

    def object_for(self, verb: Verb) -> NP:
        cls = self.pick(verb.objects)
        if cls == "drink":
            return self.drink_phrase()
        if cls == "person" and self.rng.random() < 0.5:
            return self.pronoun() if self.rng.random() < 0.5 else self.name()
        return self.noun_phrase([cls], "obj")


# --------------------------------------------------------------------------- clauses


def _be(subj: NP, past: bool = False) -> str:
    if past:
        return "were" if subj.plural or subj.person == 2 else "was"
    if subj.person == 1 and not subj.plural:
        return "am"
    return "are" if subj.plural or subj.person == 2 else "is"


def _do(subj: NP) -> str:
    return "does" if subj.person == 3 and not subj.plural else "do"


def _present(subj: NP, base: str) -> str:
    if subj.person == 3 and not subj.plural:
        return _inflect_first(base, _third)
    return base


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


@dataclass
class Clause:
    zh: str
    en: str
    combos: set[str] = field(default_factory=set)


def _time_for(g: Grammar, tense: str) -> tuple[str, str]:
    """A time word matching the tense, or none: ('昨天', 'yesterday')."""
    if g.rng.random() < 0.45:
        return "", ""
    zh, en, t = g.pick([row for row in TIMES if row[2] == tense])
    if tense == "present" and zh == "现在":
        return "", ""  # 现在 goes with the progressive only
    return zh, en


def action(g: Grammar, mood: str = "statement") -> Clause:
    """Subject + verb (+ object) in one of four tense/aspects, optionally negated or asked.

    mood: statement | yesno | what | who | where
    Example: 他昨天没吃苹果 -> 'he did not eat apples yesterday'.
    """
    verb = g.pick([v for v in VERBS if v.objects] if mood == "what" else VERBS)
    subj = NP("谁", "who", "who") if mood == "who" else g.person("subj")
    obj = g.object_for(verb) if verb.objects else None
    tenses = ["present", "past", "future"] + ([] if mood == "where" else ["progressive"])
    tense = g.pick(tenses)
    neg = mood == "statement" and g.rng.random() < 0.3
    if tense == "progressive":
        t_zh, t_en = ("现在", "now") if g.rng.random() < 0.3 else ("", "")
        place = None  # 正在 + a place phrase reads badly; keep the progressive plain
    else:
        t_zh, t_en = _time_for(g, tense)
        place = g.pick(PLACES) if g.rng.random() < 0.2 and mood != "where" else None
    combos = set(obj.combos) if obj else set()
    if obj is not None and obj.noun is not None:
        combos.add(_combo(verb.base, obj.noun.sg))

    # Chinese word order: [time] subject [time] aux/negation [在 place] verb [了] object [吗]
    pre, le = {
        "present": ("不" if neg else "", ""),
        "past": ("没" if neg else "", "" if neg else "了"),
        "future": ("不会" if neg else "会", ""),
        "progressive": ("没在" if neg else "正在", ""),
    }[tense]
    loc_zh = "在哪里" if mood == "where" else (f"在{place[0]}" if place else "")
    o_zh = "什么" if mood == "what" else (obj.zh if obj else "")
    head = f"{t_zh}{subj.zh}" if g.rng.random() < 0.4 else f"{subj.zh}{t_zh}"
    zh = f"{head}{pre}{loc_zh}{verb.zh}{le}{o_zh}" + ("吗" if mood == "yesno" else "")

    o_en = obj.obj if obj and mood != "what" else ""
    en = _english_action(subj, verb, tense, neg, mood, o_en, place[2] if place else "", t_en)
    return Clause(zh, en, combos)


def _english_action(subj: NP, verb: Verb, tense: str, neg: bool, mood: str,
                    obj: str, loc: str, time: str) -> str:
    base = verb.base
    tail = _join(obj, loc, time)
    if mood == "statement" or mood == "who":
        if tense == "present":
            vp = _join(_do(subj), "not", base) if neg else _present(subj, base)
        elif tense == "past":
            vp = _join("did not", base) if neg else verb.past_form
        elif tense == "future":
            vp = _join("will not" if neg else "will", base)
        else:
            vp = _join(_be(subj), "not" if neg else "", verb.ing_form)
        return _join(subj.en, vp, tail)
    aux, main = {
        "present": (_do(subj), base),
        "past": ("did", base),
        "future": ("will", base),
        "progressive": (_be(subj), verb.ing_form),
    }[tense]
    if mood == "yesno":
        return _join(aux, subj.en, main, tail)
    wh = {"what": "what", "where": "where"}[mood]
    return _join(wh, aux, subj.en, main, tail)


def motion(g: Grammar, mood: str = "statement") -> Clause:
    """Going to a place: 他明天会去北京 -> 'he will go to Beijing tomorrow'."""
    subj = g.person("subj")
    zh_place, to_en, _at = g.pick(PLACES)
    tense = g.pick(["present", "past", "future"])
    neg = mood == "statement" and g.rng.random() < 0.3
    t_zh, t_en = _time_for(g, tense)
    pre = {"present": "不" if neg else "", "past": "没" if neg else "", "future": "不会" if neg else "会"}[tense]
    le = "了" if tense == "past" and not neg else ""
    target = "哪里" if mood == "where" else zh_place
    zh = f"{subj.zh}{t_zh}{pre}去{le}{target}" + ("吗" if mood == "yesno" else "")
    go = Verb("去", "go", ("place",), "went", "going")
    return Clause(zh, _english_action(subj, go, tense, neg, mood,
                                      "" if mood == "where" else to_en, "", t_en))


def location(g: Grammar, mood: str = "statement") -> Clause:
    """Where a thing is: 书在桌子上 -> 'the book is on the table'."""
    thing = g.noun_phrase(["thing", "read", "food", "animal"], "subj")
    landmark = g.pick(LANDMARKS)
    pos_zh, pos_en = g.pick(POSITIONS)
    neg = mood == "statement" and g.rng.random() < 0.25
    be = _be(thing)
    if mood == "where":
        return Clause(f"{thing.zh}在哪里", _join("where", be, thing.en), set(thing.combos))
    zh = f"{thing.zh}{'不' if neg else ''}在{landmark.zh}{pos_zh}" + ("吗" if mood == "yesno" else "")
    where = f"{pos_en} the {landmark.sg}"
    if mood == "yesno":
        return Clause(zh, _join(be, thing.en, where), set(thing.combos))
    return Clause(zh, _join(thing.en, be, "not" if neg else "", where), set(thing.combos))


def existential(g: Grammar) -> Clause:
    """There is/are: 桌子上有三本书 -> 'there are three books on the table'."""
    landmark = g.pick(LANDMARKS)
    pos_zh, pos_en = g.pick(POSITIONS)
    while True:
        thing = g.noun_phrase(["thing", "read", "food", "animal"], "obj")
        if thing.zh[0] in "一两三四五六七八九十":  # existentials take a counted noun
            break
    be = "are" if thing.plural else "is"
    return Clause(f"{landmark.zh}{pos_zh}有{thing.zh}",
                  _join("there", be, thing.en, pos_en, "the", landmark.sg), set(thing.combos))


def possession(g: Grammar, mood: str = "statement") -> Clause:
    """Having: 他有两只猫 -> 'he has two cats'; 他没有车 -> 'he does not have any cars'."""
    subj = g.person("subj")
    noun = g.pick([n for n in NOUNS if n.cls in ("thing", "animal", "read")])
    if mood == "yesno":
        return Clause(f"{subj.zh}有{noun.zh}吗", _join(_do(subj), subj.en, "have", noun.pl),
                      {_combo("have", noun.sg)})
    if g.rng.random() < 0.3:
        return Clause(f"{subj.zh}没有{noun.zh}",
                      _join(subj.en, _do(subj), "not have any", noun.pl), {_combo("have", noun.sg)})
    obj = g.noun_phrase([noun.cls], "obj")
    return Clause(f"{subj.zh}有{obj.zh}", _join(subj.en, _present(subj, "have"), obj.obj),
                  set(obj.combos) | {_combo("have", obj.noun.sg)})


def quality(g: Grammar, mood: str = "statement") -> Clause:
    """Adjective predicate: 这只猫很可爱 -> 'this cat is cute'; 非常 -> 'very'."""
    subj = g.person("subj") if g.rng.random() < 0.4 else g.noun_phrase(["thing", "animal", "food", "read"], "subj")
    cls = subj.noun.cls if subj.noun else "person"
    adj = g.pick([a for a in ADJECTIVES if cls in a.classes])
    combos = {_combo(adj.en, subj.noun.sg)} if subj.noun else set()
    be = _be(subj)
    if mood == "yesno":
        return Clause(f"{subj.zh}{adj.pred}吗", _join(be, subj.en, adj.en), combos)
    deg_zh, deg_en = g.pick([("很", ""), ("很", ""), ("非常", "very"), ("不", "not"), ("太", "too")])
    return Clause(f"{subj.zh}{deg_zh}{adj.pred}", _join(subj.en, be, deg_en, adj.en), combos)


def comparison(g: Grammar, mood: str = "statement") -> Clause:
    """比 comparatives: 他比她高 -> 'he is taller than her'; 没有 -> 'not as tall as'."""
    if g.rng.random() < 0.5:
        a, b = g.person("subj"), g.person("obj")
        cls = "person"
    else:
        cls = g.pick(["thing", "animal", "food", "read"])
        a, b = g.noun_phrase([cls], "subj"), g.noun_phrase([cls], "subj")
    adj = g.pick([x for x in ADJECTIVES if cls in x.classes])
    be = _be(a)
    if mood == "yesno":
        return Clause(f"{a.zh}比{b.zh}{adj.pred}吗", _join(be, a.en, adj.comparative, "than", b.obj))
    if g.rng.random() < 0.25:
        return Clause(f"{a.zh}没有{b.zh}{adj.pred}", _join(a.en, be, "not as", adj.en, "as", b.obj))
    return Clause(f"{a.zh}比{b.zh}{adj.pred}", _join(a.en, be, adj.comparative, "than", b.obj))


def whereabouts(g: Grammar, mood: str = "statement") -> Clause:
    """Being somewhere: 他昨天在学校 -> 'he was at school yesterday'; 她在哪里 -> 'where is she'."""
    subj = g.person("subj")
    if mood == "where":
        return Clause(f"{subj.zh}在哪里", _join("where", _be(subj), subj.en))
    zh_place, _to, at = g.pick(PLACES)
    tense = g.pick(["present", "past"])
    t_zh, t_en = _time_for(g, tense)
    be = _be(subj, past=tense == "past")
    if mood == "yesno":
        return Clause(f"{subj.zh}{t_zh}在{zh_place}吗", _join(be, subj.en, at, t_en))
    return Clause(f"{subj.zh}{t_zh}在{zh_place}", _join(subj.en, be, at, t_en))


STATEMENTS = (action, action, action, motion, location, existential, possession, quality,
              comparison, whereabouts)
QUESTIONS = ((action, "yesno"), (action, "what"), (action, "who"), (action, "where"),
             (motion, "yesno"), (motion, "where"), (location, "yesno"), (location, "where"),
             (possession, "yesno"), (quality, "yesno"), (comparison, "yesno"),
             (whereabouts, "yesno"), (whereabouts, "where"))


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def sentence(g: Grammar) -> tuple[Pair, set[str]]:
    """One sentence pair and the word combinations it uses."""
    r = g.rng.random()
    if r < 0.55:
        c = g.pick(STATEMENTS)(g)
        return Pair(c.zh + "。", _capitalize(c.en) + "."), c.combos
    if r < 0.8:
        fn, mood = g.pick(QUESTIONS)
        c = fn(g, mood)
        return Pair(c.zh + "？", _capitalize(c.en) + "?"), c.combos
    a, b = g.pick(STATEMENTS)(g), g.pick(STATEMENTS)(g)
    link = g.pick(["because", "but", "so"])
    if link == "because":
        zh, en = f"因为{a.zh}，所以{b.zh}。", f"Because {a.en}, {b.en}."
    elif link == "but":
        zh, en = f"{a.zh}，但是{b.zh}。", f"{_capitalize(a.en)}, but {b.en}."
    else:
        zh, en = f"{a.zh}，所以{b.zh}。", f"{_capitalize(a.en)}, so {b.en}."
    return Pair(zh, en), a.combos | b.combos


# --------------------------------------------------------------------------- splits


def held_out(combo: str) -> bool:
    """True for the ~1 in 12 word combinations that only the test split may use (stable across runs)."""
    return zlib.crc32(combo.encode()) % 12 == 0


def generate_corpus(seed: int = 0, n_train: int = 40_000, n_dev: int = 500,
                    n_test: int = 1_200, novel_frac: float = 0.4) -> dict[str, list[Pair]]:
    """Deterministic train/dev/test splits; sources never repeat across splits.

    `novel_frac` of the test split uses at least one held-out combination, i.e. a
    verb+object or adjective+noun pair that never occurs in training.
    """
    g = Grammar(random.Random(seed))
    seen: set[str] = set()
    splits: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    quota = {"train": n_train, "dev": n_dev, "test": n_test - int(n_test * novel_frac)}
    novel: list[Pair] = []
    while (len(novel) < n_test - quota["test"]
           or any(len(splits[name]) < size for name, size in quota.items())):
        pair, combos = sentence(g)
        if pair.zh in seen:
            continue
        if any(held_out(c) for c in combos):
            if len(novel) < n_test - quota["test"]:
                novel.append(pair)
                seen.add(pair.zh)
            continue
        for name, size in quota.items():
            if len(splits[name]) < size:
                splits[name].append(pair)
                seen.add(pair.zh)
                break
    splits["test"] += novel
    random.Random(seed + 1).shuffle(splits["test"])
    return splits


# Function words between content words; what is left of the English lexicon forms a combination.
FUNCTION_WORDS = frozenset(
    "a an the to of in on at up out with for some this that these those his her their my your our its".split())


def english_content_words() -> frozenset[str]:
    """The English side of the lexicon: noun, adjective and verb forms ('pencil', 'pencils', 'old', 'reads')."""
    words: set[str] = set()
    for n in NOUNS:
        words |= {*n.sg.split(), *n.pl.split()}
    for a in ADJECTIVES:
        words |= set(a.en.split())
    for v in VERBS:
        for form in (v.base, v.past_form, v.ing_form, _inflect_first(v.base, _third)):
            words |= set(form.split())
    return frozenset(w.lower() for w in words) - FUNCTION_WORDS


def content_pairs(text: str, vocabulary: frozenset[str]) -> set[tuple[str, str]]:
    """Adjacent English content words: 'He has nine green notebooks.' -> {('green', 'notebooks')}."""
    words = "".join(c if c.isalpha() or c == "'" else " " for c in text.lower()).split()
    return {(a, b) for a, b in zip(words, words[1:]) if a in vocabulary and b in vocabulary}


def unseen_pairs(test: list[Pair], train: list[Pair]) -> list[set[tuple[str, str]]]:
    """Per test pair, the adjacent content-word pairs of its reference that no training reference has.

    Measured on the text, independently of the generator's bookkeeping: a non-empty set means the
    sentence asks the model to compose words it never saw side by side ('old pencil').
    """
    vocabulary = english_content_words()
    seen = set().union(*(content_pairs(p.en, vocabulary) for p in train))
    return [content_pairs(p.en, vocabulary) - seen for p in test]
