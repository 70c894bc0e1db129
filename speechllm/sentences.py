"""What the synthetic speakers say: a conversational English grammar, the cut points that make
INCOMPLETE turns, backchannels, the CTC-style normalisation and the held-out text splits.

    >>> rng = random.Random(0)
    >>> complete(rng), incomplete(rng), backchannel(rng, BACKCHANNELS)

Why a grammar and not a text corpus: the registries' offline English (Debian's word lists and
fortune files, book text on PyPI) is written prose, not what people say to a voice agent, and
an INCOMPLETE turn must be cut where a speaker would go on, which needs the parse the grammar
already has. Templates mark those points with a "|" after a word ("we should| call the| bank"):
after an auxiliary or modal, an article or possessive, a preposition, a conjunction, "to",
"that", a degree word, a subject pronoun inside a clause, or a filler.

- COMPLETE: statements (six tenses, negation, adverbials, a second clause), questions (yes/no
  and wh-), opinions, and short replies ("Yes, it was.", "About 20 minutes.", "Yeah, I think
  that's right.").
- INCOMPLETE: one of those cut at a marked point ("we should call the"), a finished clause with
  a conjunction ("I called the bank and"), filler openings ("so um"), fragments after a
  backchannel word ("yeah, but the"), and fragments trailing into a filler ("in the, uh").
- BACKCHANNEL: acknowledgements; "yeah" is one, "Yeah, I think that's right." is a COMPLETE reply.

Written text is cased and punctuated (COMPLETE ends with "." or "?", INCOMPLETE and BACKCHANNEL
have no final mark); `normalize` gives the CTC form: lowercase, no punctuation but in-word
apostrophes, hyphens as spaces, numbers spelled out. Splits are a hash of the normalised text,
so a text lands in one split only; the five commonest backchannels are in every split.
"""
import hashlib
import random
import re

from . import tokenizer

TAGS = tuple(t.strip("<>") for t in tokenizer.TAGS)  # the labels, as manifests write them


def P(template: str) -> list[tuple[str, bool]]:
    """Template -> tokens [(word, cut_after)]: a trailing "|" marks a natural cut point."""
    return [(t.rstrip("|"), t.endswith("|")) for t in template.split()]


def pick(rng: random.Random, options: str) -> str:
    """One of the "/"-separated options."""
    return rng.choice(options.split("/"))


# -----------------------------------------------------------------------------
# noun phrases

PRONOUNS = [("I", "1s"), ("you", "2"), ("we", "p"), ("they", "p"), ("he", "3s"), ("she", "3s")]
PEOPLE = ("my brother/my sister/the manager/our neighbour/my friend from work/the new teacher/his uncle/"
          "her cousin/our landlord/the doctor/my roommate/the bus driver/my boss/the guy next door/my daughter/"
          "my son/my mum/my dad/the receptionist/my grandmother/the whole team/everyone at the office/"
          "Sarah/Tom/Priya/David/Maria/Ben/Aisha/Jack")
GROUPS = "my parents/the kids/our neighbours/the students/my friends/the people upstairs/the engineers/my grandparents"
AGREE = {"be": {"1s": "am", "3s": "is"}, "was": {"1s": "was", "3s": "was"}, "have": {"3s": "has"},
         "do": {"3s": "does"}}
DEFAULT = {"be": "are", "was": "were", "have": "have", "do": "do"}

# Nouns per kind; "*" marks a mass noun (no "a"), "+" a plural.
NOUNS = {
    "person": "plumber/doctor/dentist/landlord/teacher/neighbour/bank/front desk/insurance company/electrician/"
              "babysitter/mechanic/manager/hotel/school/vet",
    "thing": "car/bike/laptop/phone/printer/sofa/table/window/fence/heater/fridge/washing machine/dishwasher/lamp/"
             "camera/suitcase/umbrella/jacket/bookshelf/kettle/microwave/router/keyboard/mirror/boxes+/chairs+/"
             "plants+/keys+/tickets+/shoes+/batteries+",
    "document": "report/contract/invoice/letter/form/email/essay/presentation/application/receipt/budget/schedule/"
                "recipe/shopping list/message/slides+/documents+/photos+",
    "food": "soup*/pasta*/salad/sandwich/cake/pizza/curry*/chicken*/omelette/pie/burger/bread*/rice*/coffee*/"
            "cookies+/vegetables+/pancakes+",
    "place": "museum/office/park/beach/station/library/market/gym/garage/kitchen/garden/hotel/restaurant/zoo/"
             "castle/airport/hospital/shopping centre/cinema/bakery",
    "event": "meeting/party/appointment/interview/trip/concert/flight/class/match/wedding/workshop/birthday party/"
             "dinner reservation/presentation/holiday/lessons+",
    "media": "movie/book/show/episode/series/podcast/album/documentary/article/video game/play/news*/reviews+",
}
ADJECTIVES = {"person": "new/other/local", "thing": "new/old/broken/blue/red/big/little/other/cheap",
              "document": "new/final/whole/first/long", "food": "cold/spicy/leftover/homemade/big",
              "place": "new/old/big/local", "event": "next/big/early/weekly/last",
              "media": "new/last/first/whole/latest"}
DETS = "the/the/the/my/your/our/his/her/their/this/that"
NUMBERS = [2, 3, 4, 5, 6, 8, 10, 12, 15, 20]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" and not word.startswith(("uni", "use", "eu")) else "a"


def noun_phrase(rng: random.Random, kind: str, definite: bool = False) -> list:
    """A determiner, maybe an adjective, a noun; cuts after the determiner and the adjective.
    definite: "the"/"my"/"this"... only (the subject of "how was ...")."""
    entry = rng.choice(NOUNS[kind].split("/"))
    noun, mass, plural = entry.rstrip("*+"), entry.endswith("*"), entry.endswith("+")
    adj = rng.choice(ADJECTIVES[kind].split("/")) if rng.random() < 0.25 else None
    det = pick(rng, DETS + ("" if definite else "/some/all the" if plural or mass else "/a/a"))
    if plural and not definite and rng.random() < 0.3:
        det = str(rng.choice(NUMBERS))  # written as digits; normalize spells them out
    if det == "a":
        det = article(adj or noun)
    return P(det + ("" if det.isdigit() else "|")) + (P(adj + "|") if adj else []) + P(noun)


def person(rng: random.Random) -> list:
    """An object that is a person: "my grandmother", "Sarah", or a noun phrase ("the plumber")."""
    if rng.random() < 0.35:
        first, *rest = rng.choice(PEOPLE.split("/")).split()
        return P(" ".join([first + ("|" if first in ("my", "the", "our", "his", "her") else "")] + rest))
    return noun_phrase(rng, "person")


def subject(rng: random.Random, pronoun_share: float = 0.5) -> tuple[list, str]:
    """Subject tokens and agreement: "1s" (I), "3s" (is/has/does, -s verbs), "2"/"p" (are/have/do)."""
    if rng.random() < pronoun_share:
        word, agr = rng.choice(PRONOUNS)
        return P(word), agr
    if rng.random() < 0.75:
        return P(rng.choice(PEOPLE.split("/"))), "3s"
    return P(rng.choice(GROUPS.split("/"))), "p"


def agree(verb: str, agr: str) -> str:
    return AGREE[verb].get(agr, DEFAULT[verb])


# -----------------------------------------------------------------------------
# verbs and clauses

# "base 3s past participle ing" and the kinds of object each takes.
VERBS = [(v.split(), kinds.split()) for v, kinds in [
    ("call calls called called calling", "person"), ("meet meets met met meeting", "person"),
    ("ask asks asked asked asking", "person"), ("visit visits visited visited visiting", "person place"),
    ("help helps helped helped helping", "person"), ("pay pays paid paid paying", "person"),
    ("fix fixes fixed fixed fixing", "thing"), ("buy buys bought bought buying", "thing food"),
    ("sell sells sold sold selling", "thing"), ("clean cleans cleaned cleaned cleaning", "thing place"),
    ("move moves moved moved moving", "thing event"), ("borrow borrows borrowed borrowed borrowing", "thing"),
    ("return returns returned returned returning", "thing"), ("find finds found found finding", "thing document"),
    ("lose loses lost lost losing", "thing document"), ("check checks checked checked checking", "thing document"),
    ("replace replaces replaced replaced replacing", "thing"), ("order orders ordered ordered ordering", "thing food"),
    ("send sends sent sent sending", "document"), ("read reads read read reading", "document media"),
    ("write writes wrote written writing", "document"), ("sign signs signed signed signing", "document"),
    ("finish finishes finished finished finishing", "document media food"),
    ("print prints printed printed printing", "document"), ("cook cooks cooked cooked cooking", "food"),
    ("make makes made made making", "food document"), ("eat eats ate eaten eating", "food"),
    ("bring brings brought brought bringing", "food thing"), ("try tries tried tried trying", "food"),
    ("cancel cancels cancelled cancelled cancelling", "event"), ("book books booked booked booking", "event"),
    ("plan plans planned planned planning", "event"), ("organise organises organised organised organising", "event"),
    ("miss misses missed missed missing", "event person"),
    ("postpone postpones postponed postponed postponing", "event"),
    ("watch watches watched watched watching", "media"),
    ("recommend recommends recommended recommended recommending", "media place"),
    ("start starts started started starting", "media document"), ("leave leaves left left leaving", "place thing"),
    ("paint paints painted painted painting", "thing place"),
]]
# Adverbials by tense: p (past), f (future), h (habit), a (any). "|" after a preposition or article.
TIMES = [(P(t), k) for k, ts in [
    ("p", "yesterday/last night/this morning/last week/2 days ago/3 weeks ago/on| Monday/on| Tuesday/"
          "on| Friday/before| lunch/after| the| meeting/at| the| weekend/in| the| afternoon/earlier today"),
    ("f", "tomorrow/tonight/next week/later/this evening/tomorrow morning/on| Monday/on| Friday/by| Friday/"
          "after| lunch/before| the| holidays/by| the| end of| the| month/in| 10 minutes/in| 2 weeks/"
          "at| 6 o'clock/at| the| weekend/after| work"),
    ("h", "every week/every day/on| Sundays/in| the| mornings/after| work/at| the| weekend"),
    ("a", "at| home/at| work/at| the| office/in| town/near| the| station/in| the| garden/with| my| brother/"
          "with| the| kids/for| my| mum/on| my| own/together/again/for| free/by| bus"),
] for t in ts.split("/")]
LINKERS = "because|/but|/so|/and then|/although|/when|/before|/after|/and|/or|/since|/if|"
REASONS = ("it was| raining/we ran out of| time/nobody else wanted to/the| price went up/it was| too| late/"
           "the| shop was| closed/she asked nicely/we had a| long day/the| car broke down/it was| cheaper/"
           "I was| tired/they were| busy/it started to| rain/we were| already late")
OPENERS = ("I think|/honestly,/to be honest,/you know,/the thing is|/actually,/well,/so,/anyway,/apparently,/"
           "luckily,/unfortunately,/I heard that|/I'm pretty sure that|/I feel like|/it turns out that|/"
           "I guess/I mean,/by the way,")


def verb_group(rng: random.Random, agr: str, forms: list, tense: str) -> list:
    """Auxiliaries and the verb for one tense; cuts after auxiliaries and "to"."""
    base, s3, past, pp, ing = forms
    if tense == "p":
        k = rng.randrange(6)
        return P(f"didn't {base}") if k == 0 else P(pick(rng, "finally/just/already") + " " + past) if k == 1 \
            else P(past)
    if tense == "f":
        k = rng.randrange(4)
        aux = ["will|", f"{agree('be', agr)} going to|", pick(rng, "should|/could|/might|/can|/would| like to|"),
               pick(rng, f"{agree('have', agr)} to|/need{'s' if agr == '3s' else ''} to|/"
                         f"want{'s' if agr == '3s' else ''} to|/won't/can't/shouldn't")][k]
        return P(aux + " " + base)
    if tense == "pm":  # past modal: "tried to", "had to"
        return P(pick(rng, "had to|/wanted to|/tried to|/forgot to|/decided to|/managed to|/promised to|/"
                           f"needed to|/{agree('was', agr)} going to|") + " " + base)
    if tense == "perf":
        return P(f"{agree('have', agr)}| " + pick(rng, "/already /just /finally /never ") + pp)
    if tense == "prog":
        return P(f"{agree('be', agr)}| {ing}")
    if tense == "pprog":
        return P(f"{agree('was', agr)}| {ing}")
    adv = pick(rng, "usually/always/often/sometimes/never")  # habit
    return P(f"{adv} {s3 if agr == '3s' else base}")


TENSE_TIME = {"p": "p", "f": "f", "pm": "p", "perf": None, "prog": "f", "pprog": "p", "h": "h"}


def clause(rng: random.Random, subj=None, agr=None, tense=None, adverbial: float = 0.5) -> list:
    """subject + verb group + object (+ adverbial)."""
    if subj is None:
        subj, agr = subject(rng)
    tense = tense or rng.choice(["p", "p", "f", "f", "pm", "perf", "prog", "pprog", "h"])
    forms, kinds = rng.choice(VERBS)
    kind = rng.choice(kinds)
    obj = person(rng) if kind == "person" and rng.random() < 0.3 else noun_phrase(rng, kind)
    toks = subj + verb_group(rng, agr, forms, tense) + obj
    want = TENSE_TIME[tense]
    if rng.random() < adverbial:
        toks += rng.choice([t for t, k in TIMES if k in (want, "a")])
    return toks


def second_clause(rng: random.Random) -> list:
    """linker + a short clause with a pronoun subject, cut after the linker and the pronoun."""
    if rng.random() < 0.4:
        body = P(rng.choice(REASONS.split("/")))
    else:
        word, agr = rng.choice(PRONOUNS)
        body = clause(rng, P(word + "|"), agr, adverbial=0.2)
    return P(rng.choice(LINKERS.split("/"))) + body


def statement(rng: random.Random) -> list:
    toks = clause(rng)
    if rng.random() < 0.25:
        toks += second_clause(rng)
    if rng.random() < 0.25:
        toks = P(rng.choice(OPENERS.split("/"))) + toks
    return toks


# -----------------------------------------------------------------------------
# questions, opinions, replies


def question(rng: random.Random) -> list:
    forms, kinds = rng.choice(VERBS)
    base, s3, past, pp, ing = forms
    kind = rng.choice(kinds)
    obj = person(rng) if kind == "person" else noun_phrase(rng, kind)
    subj, agr = subject(rng, 0.7)
    if len(subj) == 1 and subj[0][0] in dict(PRONOUNS):  # "did you|": a natural fragment, "did Sarah" less so
        subj = [(subj[0][0], True)]
    k = rng.randrange(10)
    if k < 2:
        return P("did|") + subj + P(base) + obj + (rng.choice([t for t, x in TIMES if x == "p"]) if k else [])
    if k < 4:
        return P(pick(rng, "can|/could|/should|/will|/would|")) + subj + P(base) + obj
    if k == 4:
        return P(agree("have", agr) + "|") + subj + P(pick(rng, "ever/already/") + " " + pp) + obj
    if k == 5:
        return P(agree("be", agr) + "|") + subj + P(ing) + obj + rng.choice([t for t, x in TIMES if x == "f"])
    if k == 6:
        wh = pick(rng, "when/where/why/how often")
        return P(wh) + P(pick(rng, "did|/do|/should|/can|") if agr != "3s" else pick(rng, "did|/does|/should|")) \
            + subj + P(base) + obj
    if k == 7:
        return P(f"what| {pick(rng, 'did|/will|/should|')}") + subj + P(base)
    if k == 8:
        kind = pick(rng, "event/media/food/place/thing")
        start = P(pick(rng, "how was/what did you| think of|/how much was/what time is")) if kind == "event" else \
            P(pick(rng, "how was/what did you| think of|/how much was/did you| like"))
        return start + noun_phrase(rng, kind, definite=True)
    return P("who") + P(past) + obj


EVALUATIONS = {"media": "good/boring/funny/too long/sad/interesting/overrated/amazing/disappointing",
               "food": "delicious/too salty/spicy/cold/good/awful/amazing", "event": "long/fun/stressful/useful/great",
               "place": "crowded/quiet/nice/busy/expensive/beautiful/tiny",
               "thing": "expensive/heavy/useful/cheap/fast/slow/noisy"}
REMARKS = ("that's a| great| idea/that sounds like a| plan/that's not what I meant/it's not worth it/I love that idea/"
           "that was a| really| good call/that's a| bit much/I'm not so sure about that/it could be worse/"
           "that makes a| lot of| sense/I don't mind either way/that's the| best| part/we'll see how it goes/"
           "it's| better than| nothing/I wouldn't do that/that's really kind of| you")


def opinion(rng: random.Random) -> list:
    k = rng.randrange(5)
    if k == 0:
        return P(pick(rng, "I think|/I don't think|/I feel like|/in my opinion,/personally, I think|/"
                           "I doubt that|/I reckon|/to me it seems like|")) + clause(rng)
    if k == 1:
        kind = rng.choice(list(EVALUATIONS))
        return noun_phrase(rng, kind, definite=True) + P(pick(rng, "is|/was|") + " " + pick(
            rng, "really|/pretty|/very|/so|/quite|/kind of|/a bit/not that|/") + " " + pick(rng, EVALUATIONS[kind]))
    if k == 2:
        kind = pick(rng, "media/food/place/event")
        subj, agr = rng.choice(PRONOUNS)
        return P(subj + " " + pick(rng, "really| liked/loved/enjoyed/hated/didn't like/really| enjoyed")) + \
            noun_phrase(rng, kind) + (rng.choice([t for t, x in TIMES if x == "p"]) if rng.random() < 0.3 else [])
    if k == 3:
        forms, kinds = rng.choice(VERBS)
        return P(pick(rng, "it would be| better to|/it's| too| late to|/we'd better|/it's| a| good| idea to|/"
                           "I'd rather|")) + P(forms[0]) + noun_phrase(rng, rng.choice(
                               [k for k in kinds if k != "person"] or ["person"]))
    return P(rng.choice(REMARKS.split("/")))


REPLY_AUX = {"1s": "am/was/do/did/have/can/will/should/could", "2": "are/were/do/did/have/can/will/should",
             "p": "are/were/do/did/have/can/will/should/could", "3s": "is/was/does/did/has/can/will/should"}
NEGATE = {"am": "I'm not", "can": "can't", "will": "won't", "do": "don't", "does": "doesn't", "did": "didn't",
          "is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't", "have": "haven't",
          "has": "hasn't", "should": "shouldn't", "could": "couldn't"}
SET_REPLIES = ("I think so/I don't think so/Not really/Not yet/Probably not/Maybe later/Not at all/I hope so/"
               "I hope not/I'm not sure/No idea/It depends/Sounds good to me/Why not?/Definitely not/"
               "Fine, thanks/Pretty good, thanks/Not bad, actually/I'd love to/No, thanks/Thanks a lot/"
               "You're welcome/Same here/Me too/Neither do I/Let me check/Hang on a second/Never mind/"
               "It was fine/That's it/That's all for now/Either is fine/Whatever you prefer/Nothing much/"
               "Just the usual/It's up to you/I already did/Not this time")
ANSWERS = ("tomorrow morning/on Monday/next week/around 6 o'clock/in 10 minutes/after lunch/at the weekend/"
           "in the kitchen/at the office/at my mum's place/on the table/in the car/20 minutes/2 hours/15 dollars/"
           "3 of them/the blue one/the one on the left/my brother did/Sarah did/the big one/last Friday")
BC_REPLIES = ("I think that's right/that makes sense/let's do that/I can do that/that sounds good/"
              "that works for me/I'll do it tomorrow/that's exactly what I meant/I remember that/"
              "we should do that again/I'll let them know/I'll call you later/see you then/I'll be there")


def reply(rng: random.Random) -> list:
    k = rng.randrange(5)
    if k < 2:  # "Yes, it was." / "No, they haven't."
        word, agr = rng.choice(PRONOUNS + [("it", "3s")])
        aux = pick(rng, REPLY_AUX[agr])
        if rng.random() < 0.5:
            return P(pick(rng, "yes,/yeah,/yep,") + " " + word + " " + aux)
        neg = NEGATE[aux] if aux != "am" else None
        return P(pick(rng, "no,/nope,/no, no,") + " " + ("I'm not" if neg is None else word + " " + neg))
    if k == 2:
        return P(rng.choice(SET_REPLIES.split("/")))
    if k == 3:
        return P(pick(rng, "/about /around /maybe /probably /just ") + rng.choice(ANSWERS.split("/"))
                 + pick(rng, "/, I think/, I guess/, apparently"))
    start = pick(rng, "yeah,/okay,/right,/sure,/yes,/oh,/alright,/exactly,")
    return P(start) + (P(rng.choice(BC_REPLIES.split("/"))) if rng.random() < 0.6 else clause(rng, adverbial=0.3))


# -----------------------------------------------------------------------------
# the three classes

FILLERS = ("so um/well, uh/and um/um, so/I mean, uh/okay, so um/so basically, uh/and then, uh/well, I was|/"
           "um, I think that|/so yeah, um/the thing is|/what I wanted to| say is|/so, uh, what happened was|/"
           "and it was| like/um, you know, the|/uh, so we|")
CORE_BACKCHANNELS = ["yeah", "uh-huh", "mm-hmm", "right", "okay"]  # in every split
BACKCHANNELS = CORE_BACKCHANNELS + (
    "yep/yes/sure/true/exactly/totally/absolutely/definitely/indeed/wow/cool/nice/great/really/hmm/alright/"
    "gotcha/oh/oh okay/oh really/oh wow/oh right/oh yeah/oh I see/oh no/oh nice/oh cool/yeah yeah/right right/"
    "okay okay/sure sure/uh-huh, yeah/I see/got it/I know/that's right/that's true/fair enough/makes sense/no way/"
    "of course/good point/for sure/you bet/I hear you/sounds good/yeah, totally/right, yeah/okay, yeah/"
    "yeah, right/mm-hmm, okay/oh, okay then/I see, yeah/wow, okay/oh my gosh/no kidding/uh-huh, right/"
    "yeah, I know/yeah, exactly/perfect/lovely/oh, interesting/right, okay/hmm, okay/okay, cool/true, true"
).split("/")


def written(toks: list, end: str = "") -> str:
    s = " ".join(w for w, _ in toks) + end
    return s[0].upper() + s[1:]


def complete(rng: random.Random) -> dict:
    kind = rng.choices(["statement", "question", "opinion", "reply"], [35, 25, 20, 20])[0]
    toks = {"statement": statement, "question": question, "opinion": opinion, "reply": reply}[kind](rng)
    end = "" if toks[-1][0].endswith("?") else "?" if kind == "question" else "."
    return {"text": written(toks, end), "kind": kind, "final": "?" if "?" in end + toks[-1][0] else "."}


def cut(rng: random.Random, toks: list) -> list:
    points = [i + 1 for i, (_, c) in enumerate(toks[:-1]) if c and i > 0]  # two words at least
    return toks[:rng.choice(points)] if points else []


def incomplete(rng: random.Random) -> dict:
    """A fragment of a turn that a speaker would go on with; "final" is the punctuation that
    gives it an ordinary (finished-sounding) sentence melody."""
    k = rng.choices(["cut", "clause_and", "filler", "backchannel_start", "trail_off"], [50, 20, 12, 10, 8])[0]
    final = "."
    if k == "cut":
        src = rng.choices([statement, question, opinion], [50, 25, 25])[0]
        toks, final = cut(rng, src(rng)), "?" if src is question else "."
    elif k == "clause_and":  # a finished clause followed by a conjunction, maybe a filler
        toks = clause(rng, adverbial=0.4) + P(pick(rng, "and/and/but/because/so/and then/or/and, um/but, uh"))
    elif k == "filler":  # "so um", or a filler opening a fragment: "so um, we should call the"
        toks = P(rng.choice(FILLERS.split("/")))
        if rng.random() < 0.5:
            toks = P(pick(rng, "so um,/well, uh,/um,/uh,/so, uh,/and um,/okay, so um,/I mean, uh,")) + \
                cut(rng, statement(rng))
    elif k == "backchannel_start":
        toks = P(pick(rng, "yeah,/okay,/right,/sure,/oh,/yes,/mm-hmm,")) + cut(rng, second_clause(rng))
    else:  # trailing into a filler: "I left the keys in the, uh"
        toks = cut(rng, statement(rng))
        toks = toks[:-1] + [(toks[-1][0] + ",", False)] + P(pick(rng, "um/uh")) if toks else []
    if not toks or not (toks[-1][1] or toks[-1][0] in ("um", "uh", "like", "and", "but", "because", "so", "or",
                                                       "then")):
        return incomplete(rng)  # nothing was left to cut, or only a filler opening and its comma
    return {"text": written(toks), "kind": k, "final": final}


def backchannel(rng: random.Random, pool: list) -> dict:
    core = [b for b in pool if b in CORE_BACKCHANNELS]
    text = rng.choice(core) if core and rng.random() < 0.5 else rng.choice(pool)
    return {"text": text[0].upper() + text[1:], "kind": "backchannel", "final": "."}


# -----------------------------------------------------------------------------
# normalisation and splits

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    if not 0 <= n < 1000:
        raise ValueError(f"number_words: {n} is outside 0-999")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))


def normalize(text: str) -> str:
    """CTC-style transcript: lowercase, numbers spelled out, hyphens as spaces, no punctuation
    except apostrophes inside words ("Yes, it's 20." -> "yes it's twenty")."""
    t = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text.lower())
    t = re.sub(r"[^a-z' ]+", " ", t.replace("-", " "))
    t = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", t)
    return " ".join(t.split())


def bucket(norm: str, dev: float = 0.1, test: float = 0.15) -> str:
    """The split a normalised text belongs to, from its hash: test, dev or train."""
    h = int(hashlib.sha1(norm.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if h < test else "dev" if h < test + dev else "train"


def make_texts(counts: dict, seed: int = 0, max_repeats: int = 3) -> dict:
    """{split: [item]} with counts[split] items per class. Splits named "test*" draw from the
    test bucket. A COMPLETE or INCOMPLETE text occurs at most max_repeats times and never in two
    splits; no normalised text carries two labels. Each item: text, text_norm, label, kind, final."""
    rng = random.Random(seed)
    out = {s: {t: [] for t in TAGS} for s in counts}
    owner = {normalize(b): "BACKCHANNEL" for b in BACKCHANNELS}  # norm -> label, first come first served
    seen = {}  # norm -> times used: short turns ("so um", "Yes, it was.") recur, as they do in speech
    gen = {"COMPLETE": complete, "INCOMPLETE": incomplete}
    for tag in ("COMPLETE", "INCOMPLETE"):
        want = sum(counts.values())
        for _ in range(100 * want + 1000):
            if want == 0:
                break
            item = gen[tag](rng)
            norm = normalize(item["text"])
            if owner.setdefault(norm, tag) != tag or seen.get(norm, 0) >= max_repeats:
                continue
            b = bucket(norm)
            room = [s for s in counts if (s.startswith("test") if b == "test" else s == b)
                    and len(out[s][tag]) < counts[s]]
            if room:
                seen[norm] = seen.get(norm, 0) + 1
                out[room[0]][tag].append({**item, "text_norm": norm, "label": tag})
                want -= 1
        if want:
            raise RuntimeError(f"the grammar ran out of distinct {tag} texts ({want} short); ask for fewer clips")
    for s in counts:
        b = "test" if s.startswith("test") else s
        pool = [x for x in BACKCHANNELS if x in CORE_BACKCHANNELS or bucket(normalize(x)) == b]
        for _ in range(counts[s]):
            item = backchannel(rng, pool)
            out[s]["BACKCHANNEL"].append({**item, "text_norm": normalize(item["text"]), "label": "BACKCHANNEL"})
    return {s: [x for tag in TAGS for x in out[s][tag]] for s in counts}
