"""A deterministic generator of short English-like stories, written for bitnet-convert.

Every document is one line: a cast of 2–4 named characters is introduced (occupation, character trait,
home town, one or two belongings), then the story keeps referring back to them by name, by the right
pronoun and by the things they own, with subject–verb agreement throughout. A small model trained on it
learns grammar *and* in-context entity tracking, so quantization damage is visible in its perplexity.

Each body sentence comes from a template that may carry a *decision point*: the sentence is split into a
``head`` and a ``tail`` and the template also writes wrong tails (a verb with the wrong number, the
wrong pronoun, another character's belonging, town, occupation or trait). :func:`generate_probes` turns
these into multiple-choice items whose context is a story prefix.

Randomness comes only from ``random.Random`` instances seeded from ``(split, seed, index)`` through
SHA-256, so every split is a fixed, disjoint stream and document ``i`` can be regenerated alone.

Usage: ``python eval/reference/corpus.py`` writes ``data/{validation,test,calib}.txt`` beside this file.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "test")


def words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of ``text``."""
    return tuple(text.split())


def phrases(text: str) -> tuple[str, ...]:
    """The comma-separated phrases of ``text``."""
    return tuple(p.strip() for p in text.split(","))


# --------------------------------------------------------------------------------------------- lexicon

MALE_NAMES = words(
    "Adam Arthur Ben Bruno Carl Colin Daniel David Edward Ethan Felix Frank George Gabriel Henry Hugo "
    "Isaac Ivan Jack James Kevin Leo Lucas Mark Martin Nathan Noah Oliver Oscar Paul Peter Robert "
    "Samuel Simon Thomas Tom Victor Walter William Owen"
)
FEMALE_NAMES = words(
    "Alice Amy Anna Bella Beth Chloe Clara Daisy Diana Ella Emma Fiona Flora Grace Hannah Helen Irene "
    "Iris Jane Julia Kate Laura Lily Lucy Maria Mia Nina Nora Olivia Paula Rachel Rose Ruby Sarah "
    "Sophie Tina Vera Wendy Zoe Eva"
)
TOWN_STARTS = words("Oak Mill Stone River Ash Elm Fox Red Green North Bright Cold Glen West")
TOWN_ENDS = words("field brook bridge ton wood ford haven vale")
TOWNS = tuple(a + b for a in TOWN_STARTS for b in TOWN_ENDS)

OCCUPATIONS = words(
    "baker teacher farmer doctor painter sailor fisher carpenter gardener nurse tailor singer writer "
    "pilot driver cook miller potter weaver builder hunter merchant musician dancer scientist engineer "
    "librarian shepherd blacksmith poet student artist inventor astronomer beekeeper jeweler mechanic "
    "photographer banker judge"
)
TRAITS = words(
    "kind brave clever quiet shy cheerful careful curious patient honest proud gentle lazy busy "
    "friendly polite nervous calm clumsy wise funny serious generous stubborn modest"
)
MOODS = words("happy sad tired hungry excited worried sleepy bored surprised thirsty lonely glad")
WEATHER = words("sunny rainy windy cloudy foggy cold warm snowy stormy bright")
ADJECTIVES = words(
    "red blue green yellow black white brown gray purple orange pink golden silver old new small "
    "large heavy shiny broken wooden tiny huge soft dusty clean strange beautiful simple fancy round "
    "little big dark bright striped spotted plain lovely ugly odd"
)
BELONGINGS = words(
    "bicycle lamp kite hat coat book map clock basket violin guitar drum boat key box umbrella scarf "
    "cup bag ring watch radio camera chair table bell bottle blanket candle compass ladder hammer "
    "shovel pencil notebook mirror pillow rope spoon teapot telescope wagon whistle brush glove jacket "
    "knife kettle lantern net pan plate puzzle ribbon sword trumpet vase wheel belt piano flute"
)
ANIMALS = words(
    "dog cat horse cow goat pig duck goose hen rabbit fox wolf bear owl crow sparrow mouse rat frog "
    "turtle squirrel donkey lamb bee butterfly swan pony puppy kitten parrot lion tiger monkey snake "
    "beetle spider crab"
)
PLACES = words(
    "market library harbor bakery school park river forest garden station museum castle bridge hill "
    "lake beach farm church hospital theater square mill tower field meadow cave island valley "
    "kitchen cafe shop zoo factory barn stable orchard pond well workshop hotel stadium palace "
    "gate fountain"
)
ADVERBS = words(
    "quickly slowly quietly loudly carefully happily sadly gently eagerly calmly proudly bravely "
    "softly patiently politely nervously cheerfully lazily silently warmly kindly"
)
TIMES = phrases(
    "In the morning, Every morning, At noon, In the afternoon, Later that day, After lunch, "
    "Before dinner, On Monday, On Tuesday, On Friday, On Sunday, The next day, That evening, "
    "One day, Soon, Then, After a while"
)
NUMBERS = words("two three four five six seven eight nine ten eleven twelve")
PREPOSITIONS = phrases("near, behind, under, beside, next to, in front of")

# Verbs are stored in the base (plural) form; third_person() makes the singular.
PERSON_ACTS = phrases(
    "sleep, rest, play, sing, dance, laugh, wait, work, listen, smile, cook, read, write, whistle, "
    "study, run, walk, swim, jump, sit down, stand up, look around, drink tea, eat lunch, "
    "watch the sky, hum a song, tell a joke"
)
ANIMAL_ACTS = phrases(
    "sleep, rest, play, jump, swim, hide, run, eat, drink, wait, sit, watch the sky, climb, dig, chase each other"
)
HANDLE_VERBS = phrases(
    "clean, carry, polish, paint, fix, hold, check, pack, wash, hide, use, bring, drop, lift, study, repair, wrap, dry"
)
SOCIAL_VERBS = phrases(
    "visit, meet, help, greet, call, thank, follow, watch, invite, join, find, remember, admire, teach, answer"
)
MOVE_VERBS = phrases("walk, go, run, hurry, ride, travel, stroll, drive, wander")
ARRIVE_VERBS = phrases("arrive at, get to, reach, come to, return to")

_IRREGULAR_PLURALS = dict(p.split(">") for p in words("mouse>mice goose>geese wolf>wolves knife>knives scarf>scarves"))
_AN_EXCEPTIONS = {"honest"}


def pluralize(noun: str) -> str:
    """Plural of a lexicon noun ("box" → "boxes", "pony" → "ponies", "mouse" → "mice")."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    """Third-person singular of a base-form verb phrase ("watch the sky" → "watches the sky")."""
    word, _, rest = verb.partition(" ")
    if word == "have":
        word = "has"
    elif word == "be":
        word = "is"
    elif word.endswith(("s", "sh", "ch", "x", "z", "o")):
        word += "es"
    elif word.endswith("y") and word[-2] not in "aeiou":
        word = word[:-1] + "ies"
    else:
        word += "s"
    return f"{word} {rest}" if rest else word


def conjugate(verb: str, plural: bool) -> str:
    """Present tense of ``verb`` agreeing with a plural or singular third-person subject."""
    return verb if plural else third_person(verb)


def article(word: str) -> str:
    """``a`` or ``an`` for the word that follows."""
    word = word.split()[0]
    return "an" if word[0] in "aeiou" or word in _AN_EXCEPTIONS else "a"


def with_article(phrase: str) -> str:
    """``phrase`` preceded by its indefinite article ("an old lamp")."""
    return f"{article(phrase)} {phrase}"


def join_names(names: list[str]) -> str:
    """``A``, ``A and B``, ``A, B and C``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def capitalize(text: str) -> str:
    """Upper-case the first character only."""
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------------------ characters


@dataclass(frozen=True)
class Character:
    """One member of a story's cast; everything the story says about them must agree with this."""

    name: str
    female: bool
    occupation: str
    trait: str
    town: str
    belongings: tuple[str, ...]  # "adjective noun", e.g. "red kite"

    @property
    def subject(self) -> str:
        return "she" if self.female else "he"

    @property
    def object(self) -> str:
        return "her" if self.female else "him"

    @property
    def possessive(self) -> str:
        return "her" if self.female else "his"


def make_cast(rng: random.Random, size: int) -> list[Character]:
    """``size`` characters with distinct names, occupations, traits, towns and belonging nouns."""
    n_female = sum(rng.random() < 0.5 for _ in range(size))
    names = [(n, True) for n in rng.sample(FEMALE_NAMES, n_female)]
    names += [(n, False) for n in rng.sample(MALE_NAMES, size - n_female)]
    rng.shuffle(names)
    occupations = rng.sample(OCCUPATIONS, size)
    traits = rng.sample(TRAITS, size)
    towns = rng.sample(TOWNS, size)
    nouns = iter(rng.sample(BELONGINGS, 2 * size))
    cast = []
    for i, (name, female) in enumerate(names):
        owned = tuple(f"{rng.choice(ADJECTIVES)} {next(nouns)}" for _ in range(rng.randint(1, 2)))
        cast.append(Character(name, female, occupations[i], traits[i], towns[i], owned))
    return cast


# ------------------------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class Sentence:
    """A sentence split at its decision point; ``wrong_tails`` are the ways to get the tail wrong."""

    head: str
    tail: str
    kind: str = "filler"
    wrong_tails: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return f"{self.head} {self.tail}" if self.head else self.tail


@dataclass
class Story:
    """The state a story needs to stay consistent: its cast and who was talked about last."""

    rng: random.Random
    cast: list[Character]
    last: Character | None = None
    sentences: list[Sentence] = field(default_factory=list)

    def pick(self, k: int = 1) -> list[Character]:
        return self.rng.sample(self.cast, k)

    def refer(self, c: Character, start: bool) -> str:
        """How to mention ``c`` as a subject: a pronoun right after they were the subject, else by name."""
        roll = self.rng.random()
        if c is self.last and roll < 0.6:
            word = c.subject
        elif roll > 0.9:
            word = f"the {c.occupation}"
        else:
            word = c.name
        self.last = c
        return capitalize(word) if start else word

    def opening(self) -> str:
        """An optional time phrase, ready to be followed by a subject."""
        return f"{self.rng.choice(TIMES)}, " if self.rng.random() < 0.35 else ""

    def start(self, c: Character) -> str:
        """Sentence start up to and including the subject ``c``."""
        time = self.opening()
        return time + self.refer(c, start=not time)

    def others(self, c: Character) -> list[Character]:
        return [d for d in self.cast if d is not c]

    def wrong_fillers(self, right: str, pool: tuple[str, ...], taken: list[str], n: int = 3) -> tuple[str, ...]:
        """``n`` wrong answers: first the values the other characters hold, then random ones from ``pool``."""
        wrong = [t for t in taken if t != right][:n]
        while len(wrong) < n:
            cand = self.rng.choice(pool)
            if cand != right and cand not in wrong and cand not in taken:
                wrong.append(cand)
        return tuple(wrong)


def introduce(story: Story) -> list[Sentence]:
    """The opening line and two sentences per character."""
    rng, cast = story.rng, story.cast
    names = join_names([c.name for c in cast])
    out = []
    roll = rng.random()
    if roll < 0.4:
        out.append(Sentence("", f"This is a story about {names}."))
    elif roll < 0.7:
        out.append(Sentence("", f"Once there were {NUMBERS[len(cast) - 2]} friends: {names}."))
    for c in cast:
        desc = f"{c.trait} {c.occupation}"
        form = rng.randrange(3)
        if form == 0:
            out.append(Sentence("", f"{c.name} is {with_article(desc)} who lives in {c.town}."))
        elif form == 1:
            out.append(Sentence("", f"{c.name} is {with_article(desc)} from {c.town}."))
        else:
            out.append(Sentence("", f"{c.name} lives in {c.town} and works as {with_article(c.occupation)}."))
            out.append(Sentence("", f"{capitalize(c.subject)} is very {c.trait}."))
        owned = join_names([with_article(b) for b in c.belongings])
        verb = rng.choice(("has", "owns", "keeps"))
        out.append(Sentence("", f"{capitalize(c.subject)} {verb} {owned}."))
        story.last = c
    return out


# Body templates. Each takes the story and returns one Sentence; those with a decision point set `kind`.


def possession(story: Story) -> Sentence:
    """``Anna cleans her | red kite.`` — the belonging must be the one this character owns."""
    rng = story.rng
    c = story.pick()[0]
    right = rng.choice(c.belongings)
    noun = right.split()[1]
    others = [b for d in story.others(c) for b in d.belongings]
    recolored = [f"{a} {noun}" for a in ADJECTIVES if f"{a} {noun}" not in c.belongings]
    wrong = tuple(rng.sample(others, min(2, len(others))))
    wrong += tuple(rng.sample(recolored, 3 - len(wrong)))
    form = rng.randrange(3)
    if form == 0:
        head = f"{story.start(c)} {third_person(rng.choice(HANDLE_VERBS))} {c.possessive}"
        end = rng.choice(("", f" {rng.choice(ADVERBS)}", f" at the {rng.choice(PLACES)}"))
    elif form == 1:
        d = rng.choice(story.others(c))
        head = f"{story.start(c)} shows {d.name} {c.possessive}"
        end = ""
    else:
        head = f"{story.start(c)} cannot find {c.possessive}"
        end = rng.choice((" anywhere", " at home", f" at the {rng.choice(PLACES)}"))
    return Sentence(head, f"{right}{end}.", "possession", tuple(f"{w}{end}." for w in wrong))


def pronoun(story: Story) -> Sentence:
    """``When Anna reaches the park, | she smiles.`` — the pronoun refers back to the named subject."""
    rng = story.rng
    c = story.pick()[0]
    story.last = c
    form = rng.randrange(3)
    if form == 0:
        head = f"When {c.name} {conjugate(rng.choice(ARRIVE_VERBS), False)} the {rng.choice(PLACES)},"
        act = f"{third_person(rng.choice(PERSON_ACTS))} {rng.choice(ADVERBS)}"
        tails = [f"{p} {act}." for p in ("she", "he")]
    elif form == 1:
        head = f"{c.name} {third_person(rng.choice(HANDLE_VERBS))} the {rng.choice(BELONGINGS)} and then"
        act = third_person(rng.choice(PERSON_ACTS))
        tails = [f"{p} {act}." for p in ("she", "he")]
    else:
        b = rng.choice(c.belongings)
        head = f"{c.name} {third_person(rng.choice(HANDLE_VERBS))}"
        tails = [f"{p} {b}." for p in ("her", "his")]
    right, wrong = (tails[0], tails[1]) if c.female else (tails[1], tails[0])
    return Sentence(head, right, "pronoun", (wrong,))


def agreement(story: Story) -> Sentence:
    """``The dogs near the old bridge | sleep quietly.`` — the verb agrees with the head noun."""
    rng = story.rng
    form = rng.randrange(5)
    if form == 0:  # two characters: plural
        a, b = story.pick(2)
        head, plural = f"{story.opening()}{a.name} and {b.name}", True
        rest = f"{rng.choice(MOVE_VERBS)} to the {rng.choice(PLACES)} together"
    elif form == 1:  # one character: singular
        c = story.pick()[0]
        head, plural = story.start(c), False
        rest = f"{rng.choice(PERSON_ACTS)} {rng.choice(ADVERBS)}"
    elif form in (2, 3):  # animals with an attractor noun of the other number
        plural = rng.random() < 0.5
        animal, thing = rng.choice(ANIMALS), rng.choice(BELONGINGS + PLACES)
        animal, thing = (pluralize(animal), thing) if plural else (animal, pluralize(thing))
        head = f"The {animal} {rng.choice(PREPOSITIONS)} the {rng.choice(ADJECTIVES)} {thing}"
        rest = f"{rng.choice(ANIMAL_ACTS)} {rng.choice(ADVERBS)}"
    else:  # a counted group: plural
        head = f"{capitalize(rng.choice(NUMBERS))} {rng.choice(ADJECTIVES)} {pluralize(rng.choice(ANIMALS))}"
        plural = True
        rest = f"{rng.choice(ANIMAL_ACTS)} in the {rng.choice(PLACES)}"
    if form != 1:
        story.last = None
    return Sentence(head, conjugate(rest, plural) + ".", "agreement", (conjugate(rest, not plural) + ".",))


def home(story: Story) -> Sentence:
    """``In the evening, Anna goes back home to | Oakfield.`` — each character's own town."""
    rng = story.rng
    c = story.pick()[0]
    wrong = story.wrong_fillers(c.town, TOWNS, [d.town for d in story.others(c)])
    if rng.random() < 0.5:
        time = rng.choice(("In the evening", "At the end of the day", "After a long day", "At night"))
        head = f"{time}, {story.refer(c, start=False)} goes back home to"
    else:
        verb = rng.choice(("misses", "thinks about", "talks about"))
        head = f"{story.refer(c, start=True)} {verb} {c.possessive} home in"
    return Sentence(head, f"{c.town}.", "home", tuple(f"{w}." for w in wrong))


def occupation(story: Story) -> Sentence:
    """``Anna, the | baker, waves at Tom.`` — each character's own occupation."""
    rng = story.rng
    c, d = story.pick(2)
    wrong = story.wrong_fillers(c.occupation, OCCUPATIONS, [e.occupation for e in story.others(c)])
    story.last = c
    rest = rng.choice(
        (
            f"waves at {d.name}",
            f"{third_person(rng.choice(SOCIAL_VERBS))} {d.name}",
            f"{third_person(rng.choice(PERSON_ACTS))} {rng.choice(ADVERBS)}",
        )
    )
    return Sentence(f"{c.name}, the", f"{c.occupation}, {rest}.", "occupation", tuple(f"{w}, {rest}." for w in wrong))


def trait(story: Story) -> Sentence:
    """``Everyone knows that Anna is very | kind.`` — each character's own trait."""
    rng = story.rng
    c, d = story.pick(2)
    wrong = story.wrong_fillers(c.trait, TRAITS, [e.trait for e in story.others(c)])
    if rng.random() < 0.5:
        head = f"Everyone knows that {c.name} is very"
    else:
        head = f"{d.name} likes {c.name} because {c.name} is so"
    story.last = c
    return Sentence(head, f"{c.trait}.", "trait", tuple(f"{w}." for w in wrong))


def filler(story: Story) -> Sentence:
    """A sentence with no decision point (still grammatical and consistent)."""
    rng = story.rng
    c, d = story.pick(2)
    form = rng.randrange(7)
    if form == 0:
        text = f"{story.start(c)} {third_person(rng.choice(SOCIAL_VERBS))} {d.name} at the {rng.choice(PLACES)}."
    elif form == 1:
        thing = f"{rng.choice(ADJECTIVES)} {rng.choice(BELONGINGS)}"
        text = f"{story.start(c)} buys {with_article(thing)} at the {rng.choice(PLACES)}."
    elif form == 2:
        text = f"The weather in {c.town} is {rng.choice(WEATHER)} today."
        story.last = None
    elif form == 3:
        move = third_person(rng.choice(MOVE_VERBS))
        text = f"{story.start(c)} {move} {rng.choice(ADVERBS)} to the {rng.choice(PLACES)}."
    elif form == 4:
        text = f"{story.start(c)} feels {rng.choice(MOODS)}."
    elif form == 5:
        thing = f"{rng.choice(ADJECTIVES)} {rng.choice(BELONGINGS)}"
        text = f"{story.start(c)} gives {d.name} {with_article(thing)}. {capitalize(d.subject)} thanks {c.object}."
        story.last = d
    else:
        story.last = None
        n = rng.randrange(len(NUMBERS) + 1)
        animal = rng.choice(ANIMALS)
        where = f"in the {rng.choice(PLACES)}"
        if n == len(NUMBERS):
            text = f"There is {with_article(rng.choice(ADJECTIVES) + ' ' + animal)} {where}."
        else:
            text = f"There are {NUMBERS[n]} {pluralize(animal)} {where}."
    return Sentence("", text)


TEMPLATES: dict[str, Callable[[Story], Sentence]] = {
    "agreement": agreement,
    "pronoun": pronoun,
    "possession": possession,
    "home": home,
    "occupation": occupation,
    "trait": trait,
    "filler": filler,
}
#: The kinds of decision point that :func:`generate_probes` can test.
PROBE_KINDS = tuple(k for k in TEMPLATES if k != "filler")
_WEIGHTS = {"agreement": 4, "pronoun": 3, "possession": 5, "home": 2, "occupation": 2, "trait": 2, "filler": 3}


def next_sentence(story: Story, kind: str | None = None) -> Sentence:
    """One body sentence, of ``kind`` or of a kind drawn with the corpus weights."""
    if kind is None:
        kind = story.rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
    sentence = TEMPLATES[kind](story)
    story.sentences.append(sentence)
    return sentence


def ending(story: Story) -> Sentence:
    """The last sentence: someone goes home, or everyone does."""
    if story.rng.random() < 0.5:
        c = story.pick()[0]
        return Sentence("", f"In the evening, {c.name} goes back home to {c.town}.")
    mood = story.rng.choice(("happy", "glad", "excited"))
    return Sentence("", f"At night, the {NUMBERS[len(story.cast) - 2]} friends are tired but {mood}.")


def new_story(rng: random.Random) -> Story:
    """A story with a fresh cast of 2–4 characters, already introduced."""
    story = Story(rng, make_cast(rng, rng.randint(2, 4)))
    story.sentences.extend(introduce(story))
    return story


def write_document(rng: random.Random, min_words: int = 80, max_words: int = 250) -> str:
    """One story as one line of text, between ``min_words`` and ``max_words`` words."""
    story = new_story(rng)
    target = rng.randint(min_words, max_words - 30)
    n_words = sum(len(s.text.split()) for s in story.sentences)
    while n_words < target or len(story.sentences) < 2 * len(story.cast) + 4:
        n_words += len(next_sentence(story).text.split())
    story.sentences.append(ending(story))
    return " ".join(s.text for s in story.sentences)


# ---------------------------------------------------------------------------------------------- streams


def stream_rng(split: str, seed: int, index: int, purpose: str = "doc") -> random.Random:
    """The RNG of item ``index`` of a stream; SHA-256 of the names, so streams never overlap or drift."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digest = hashlib.sha256(f"{purpose}/{split}/{seed}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def iter_documents(split: str, seed: int = 0, start: int = 0) -> Iterator[str]:
    """Endless stream of documents of ``split`` from index ``start``."""
    index = start
    while True:
        yield write_document(stream_rng(split, seed, index))
        index += 1


def generate_documents(split: str, n_docs: int, seed: int = 0) -> list[str]:
    """The first ``n_docs`` documents of ``split`` (``train``, ``validation`` or ``test``)."""
    return [write_document(stream_rng(split, seed, i)) for i in range(n_docs)]


# ----------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """A multiple-choice item: score ``context + " " + choice`` for each choice; ``choices[label]`` is right."""

    context: str
    choices: tuple[str, ...]
    label: int
    kind: str


def make_probe(rng: random.Random, kind: str) -> Probe:
    """A story prefix (introduction plus 0–8 body sentences) ending at a decision point of ``kind``."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")
    story = new_story(rng)
    for _ in range(rng.randint(0, 8)):
        next_sentence(story)
    prefix = " ".join(s.text for s in story.sentences)
    probe = next_sentence(story, kind)
    choices = [probe.tail, *probe.wrong_tails]
    rng.shuffle(choices)
    context = f"{prefix} {probe.head}" if probe.head else prefix
    return Probe(context, tuple(choices), choices.index(probe.tail), kind)


def generate_probes(split: str, kind: str, n: int, seed: int = 0) -> list[Probe]:
    """``n`` probes of ``kind`` from their own stream of ``split`` (disjoint from the documents)."""
    return [make_probe(stream_rng(split, seed, i, purpose=f"probe-{kind}"), kind) for i in range(n)]


#: Word classes for :func:`make_wordclass_probe`, grouped by part of speech (nouns, adjectives).
WORD_CLASSES = {
    "place": ("noun", PLACES),
    "animal": ("noun", ANIMALS),
    "belonging": ("noun", BELONGINGS),
    "occupation": ("noun", OCCUPATIONS),
    "mood": ("adjective", MOODS),
    "weather": ("adjective", WEATHER),
    "trait": ("adjective", TRAITS),
    "look": ("adjective", ADJECTIVES),
}


def make_wordclass_probe(rng: random.Random) -> Probe:
    """A story prefix and four versions of the next sentence: the real one, and three where one noun or
    adjective is swapped for a word of another class of the same part of speech (``feels sleepy`` →
    ``feels modest``, ``at the hill`` → ``at the violin``). Needs only local knowledge of the lexicon."""
    story = new_story(rng)
    for _ in range(rng.randint(0, 8)):
        next_sentence(story)
    prefix = " ".join(s.text for s in story.sentences)
    while True:
        sentence = next_sentence(story).text
        tokens = sentence.split()
        slots = []
        for i, token in enumerate(tokens[1:], start=1):
            classes = [k for k, (_, pool) in WORD_CLASSES.items() if token.rstrip(".,") in pool]
            if classes:
                slots.append((i, classes))
        if slots:
            break
    wrong: list[str] = []
    while len(wrong) < 3:
        i, classes = rng.choice(slots)
        fitting = set().union(*(WORD_CLASSES[k][1] for k in classes))
        part = WORD_CLASSES[classes[0]][0]
        others = [k for k, (pos, pool) in WORD_CLASSES.items() if pos == part and not fitting & set(pool)]
        word = rng.choice(WORD_CLASSES[rng.choice(others)][1])
        if word in tokens:
            continue
        swapped = " ".join([*tokens[:i], word + tokens[i][len(tokens[i].rstrip(".,")) :], *tokens[i + 1 :]])
        if swapped not in wrong:
            wrong.append(swapped)
    choices = [sentence, *wrong]
    rng.shuffle(choices)
    return Probe(prefix, tuple(choices), choices.index(sentence), "wordclass")


def generate_wordclass_probes(split: str, n: int, seed: int = 0) -> list[Probe]:
    """``n`` word-class probes from their own stream of ``split`` (disjoint from documents and other probes)."""
    return [make_wordclass_probe(stream_rng(split, seed, i, purpose="probe-wordclass")) for i in range(n)]


# ------------------------------------------------------------------------------------------------- main


def write_split(path: Path, docs: list[str]) -> None:
    """One document per line, UTF-8, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")


def main() -> None:
    """Write the committed data files: validation and test documents and a calibration sample of train."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-validation", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--n-calib", type=int, default=256)
    args = parser.parse_args()
    write_split(args.out / "validation.txt", generate_documents("validation", args.n_validation, args.seed))
    write_split(args.out / "test.txt", generate_documents("test", args.n_test, args.seed))
    write_split(args.out / "calib.txt", generate_documents("train", args.n_calib, args.seed))
    for name in ("validation", "test", "calib"):
        path = args.out / f"{name}.txt"
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
