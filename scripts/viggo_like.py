"""ViGGO-style synthetic data: a sentence about a video game -> its meaning representation.

A development tool, not part of the package: `make demo --generated`, the trainer tests and the benchmarks
use it where no real ViGGO is at hand.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The order attributes appear in inside a meaning representation, whatever the function.
ATTRIBUTE_ORDER = ("name", "release_year", "developer", "esrb", "rating", "genres", "player_perspective",
                   "has_multiplayer", "platforms", "specifier")
FUNCTIONS = ("inform", "give_opinion", "verify_attribute", "request", "recommend", "request_explanation",
             "confirm", "suggest", "request_attribute")
_FUNCTION_WEIGHTS = (35, 10, 10, 7, 8, 8, 8, 8, 6)  # roughly ViGGO's mix


@dataclass(frozen=True)
class Game:
    name: str
    release_year: str
    developer: str
    esrb: str
    genres: tuple[str, ...]
    player_perspective: str
    has_multiplayer: str  # yes | no
    platforms: tuple[str, ...]


_E, _E10, _T, _M = ("E (for Everyone)", "E 10+ (for Everyone 10 and Older)", "T (for Teen)", "M (for Mature)")
GAMES = (
    Game("Portal 2", "2011", "Valve Corporation", _E10, ("puzzle", "platformer", "shooter"), "first person",
         "yes", ("PlayStation", "Xbox", "PC")),
    Game("The Witcher 3: Wild Hunt", "2015", "CD Projekt RED", _M, ("action-adventure", "role-playing"),
         "third person", "no", ("PlayStation", "Xbox", "PC")),
    Game("Minecraft", "2011", "Mojang", _E10, ("adventure", "simulation"), "first person", "yes",
         ("PlayStation", "Xbox", "PC", "Nintendo Switch")),
    Game("Stardew Valley", "2016", "ConcernedApe", _E, ("role-playing", "simulation", "indie"), "bird view",
         "yes", ("PlayStation", "Xbox", "PC", "Nintendo Switch")),
    Game("Celeste", "2018", "Matt Makes Games", _E10, ("platformer", "indie"), "side view", "no",
         ("PlayStation", "Xbox", "PC", "Nintendo Switch")),
    Game("Halo 3", "2007", "Bungie", _M, ("shooter",), "first person", "yes", ("Xbox",)),
    Game("Rocket League", "2015", "Psyonix", _E, ("driving/racing", "sport"), "third person", "yes",
         ("PlayStation", "Xbox", "PC", "Nintendo Switch")),
    Game("Hollow Knight", "2017", "Team Cherry", _E10, ("action", "platformer", "indie"), "side view", "no",
         ("PlayStation", "Xbox", "PC", "Nintendo Switch")),
    Game("StarCraft II", "2010", "Blizzard Entertainment", _T, ("real-time strategy",), "bird view", "yes",
         ("PC",)),
    Game("The Last of Us", "2013", "Naughty Dog", _M, ("action-adventure", "shooter"), "third person", "yes",
         ("PlayStation",)),
    Game("Mario Kart 8 Deluxe", "2017", "Nintendo", _E, ("driving/racing",), "third person", "yes",
         ("Nintendo Switch",)),
)
RATING_WORDS = {
    "excellent": ("excellent", "amazing", "fantastic"),
    "good": ("good", "solid", "decent"),
    "average": ("average", "mediocre", "so-so"),
    "poor": ("poor", "bad", "disappointing"),
}
SPECIFIERS = ("fun", "relaxing", "difficult", "funny", "underrated", "scary", "quirky", "beautiful")
_REQUESTED = {  # request_attribute: the attribute asked about -> ways to ask
    "genres": ("What kind of games do you like to play?", "Which game genres do you enjoy the most?"),
    "platforms": ("Which gaming platform do you usually play on?", "What do you play your games on?"),
    "player_perspective": ("Do you prefer any particular player perspective in games?",
                           "Which camera perspective do you like best when you play?"),
    "has_multiplayer": ("Do you like playing games with other people?",
                        "Do you enjoy multiplayer games, or do you rather play alone?"),
    "release_year": ("What do you think was the best year for games?",
                     "Which year do you think had the best game releases?"),
    "developer": ("Is there a game developer whose games you always enjoy?",
                  "Which studio makes your favorite games?"),
    "esrb": ("Do ESRB ratings matter to you when you pick a game?",
             "Do you pay attention to the ESRB rating of a game?"),
}

Attrs = dict[str, str]


def viggo_like_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` synthetic ViGGO-style rows {"ref": sentence, "mr": meaning representation}, deterministic by seed.

    Nine dialogue acts (inform, request, give_opinion, confirm, suggest, request_explanation,
    verify_attribute, recommend, request_attribute) about eleven games with genres, platforms, rating,
    release_year, developer, player_perspective, has_multiplayer, esrb (and request's specifier). Each
    sentence is built from varied templates, but every value of the MR is stated in it (ratings by one of
    a few adjectives each), and the MR lists attributes in one canonical order: the MR is a function of
    the sentence, so a model can learn it exactly.
    """
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for _ in range(n):
        function = rng.choices(FUNCTIONS, weights=_FUNCTION_WEIGHTS)[0]
        attrs, ref = _ACTS[function](rng, rng.choice(GAMES))
        rows.append({"ref": ref, "mr": meaning_representation(function, attrs)})
    return rows


def meaning_representation(function: str, attrs: Attrs) -> str:
    """`inform(name[Portal 2], genres[puzzle, platformer])`: attributes in ATTRIBUTE_ORDER."""
    ordered = sorted(attrs, key=ATTRIBUTE_ORDER.index)
    return f"{function}({', '.join(f'{a}[{attrs[a]}]' for a in ordered)})"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _a(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"


def _adj(rng: random.Random, rating: str) -> str:
    return rng.choice(RATING_WORDS[rating])


def _games(attrs: Attrs) -> str:
    """A noun phrase for games with `attrs`: 'multiplayer first person shooter games on PC by Bungie'."""
    words = []
    if attrs.get("has_multiplayer") == "yes":
        words.append("multiplayer")
    if "player_perspective" in attrs:
        words.append(attrs["player_perspective"])
    if "genres" in attrs:
        words.append(_join(attrs["genres"].split(", ")))
    words.append("games")
    if "release_year" in attrs:
        words.append(f"from {attrs['release_year']}")
    if "developer" in attrs:
        words.append(f"by {attrs['developer']}")
    if "platforms" in attrs:
        words.append(f"on {attrs['platforms']}")
    if "esrb" in attrs:
        words.append(f"rated {attrs['esrb']}")
    return " ".join(words)


def _fact(game: Game, attribute: str, rng: random.Random) -> str:
    """The game's value of `attribute` as the MR writes it (one platform where a single one is meant)."""
    if attribute == "platforms":
        return rng.choice(game.platforms)
    value = getattr(game, attribute)
    return ", ".join(value) if isinstance(value, tuple) else str(value)


def _pick(rng: random.Random, options: Sequence[str], k_min: int, k_max: int) -> list[str]:
    return rng.sample(list(options), rng.randint(k_min, min(k_max, len(options))))


def _inform(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    chosen = _pick(rng, ("release_year", "developer", "esrb", "rating", "genres", "player_perspective",
                         "has_multiplayer", "platforms"), 2, 5)
    attrs: Attrs = {"name": game.name}
    for a in chosen:
        attrs[a] = rng.choice(("excellent", "good", "average", "poor")) if a == "rating" else (
            ", ".join(game.platforms) if a == "platforms" else _fact(game, a, rng))
    # The first sentence: "[Released in Y,] NAME is a [ADJ] [GENRES] game [released in Y] [by DEV]."
    kind = " ".join([*([_adj(rng, attrs["rating"])] if "rating" in attrs else []),
                     *([_join(game.genres)] if "genres" in attrs else []), "game"])
    head = f"{game.name} is {_a(kind)}"
    if "release_year" in attrs:
        if rng.random() < 0.4:
            head = f"{rng.choice(('Released in', 'First released in'))} {game.release_year}, {head}"
        else:
            head += f" {rng.choice(('released in', 'from', 'that came out in'))} {game.release_year}"
    if "developer" in attrs:
        head += f" {rng.choice(('by', 'developed by', 'made by'))} {game.developer}"
    sentences = [head + "."]
    rest: list[str] = []
    if "platforms" in attrs:
        rest.append(rng.choice(("It is available on {}.", "You can play it on {}.", "It came out for {}."))
                    .format(_join(game.platforms)))
    if "player_perspective" in attrs:
        rest.append(rng.choice(("It is played from a {} perspective.", "It has a {} perspective."))
                    .format(game.player_perspective))
    if "has_multiplayer" in attrs:
        rest.append(rng.choice(("It has multiplayer.", "It supports multiplayer.",
                                "You can play it with friends.") if game.has_multiplayer == "yes" else
                               ("It has no multiplayer.", "It is single-player only.",
                                "It does not support multiplayer.")))
    if "esrb" in attrs:
        rest.append(rng.choice(("It is rated {}.", "The ESRB rated it {}.")).format(game.esrb))
    rng.shuffle(rest)
    return attrs, " ".join(sentences + rest)


def _give_opinion(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    rating = rng.choice(tuple(RATING_WORDS))
    adj = _adj(rng, rating)
    attrs: Attrs = {"name": game.name, "rating": rating}
    extra = rng.choice(("", "genres", "player_perspective", "has_multiplayer", "developer"))
    if extra:
        attrs[extra] = _fact(game, extra, rng)
    if extra == "genres":
        ref = rng.choice(("I think {n} is {k}.", "In my opinion, {n} is {k}.")).format(
            n=game.name, k=_a(f"{adj} {_join(game.genres)} game"))
    elif extra == "player_perspective":
        ref = f"I found {game.name} {adj}, and the {game.player_perspective} perspective is part of why."
    elif extra == "has_multiplayer":
        ref = (f"{game.name} is {adj}, especially the multiplayer." if game.has_multiplayer == "yes"
               else f"{game.name} is {adj}, even without any multiplayer.")
    elif extra == "developer":
        ref = f"{game.developer} did {_a(adj)} job with {game.name}."
    else:
        ref = rng.choice(("I think {n} is {k}.", "{n} is {j}, in my opinion.", "Honestly, {n} is {k}.")).format(
            n=game.name, k=_a(f"{adj} game"), j=adj)
    return attrs, ref


def _confirm(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    attrs: Attrs = {"name": game.name}
    for a in _pick(rng, ("release_year", "developer", "genres", "player_perspective", "platforms"), 1, 2):
        attrs[a] = _fact(game, a, rng)
    desc = " ".join([*([attrs["player_perspective"]] if "player_perspective" in attrs else []),
                     *([_join(game.genres)] if "genres" in attrs else []), "game"])
    if "release_year" in attrs:
        desc += f" from {attrs['release_year']}"
    if "developer" in attrs:
        desc += f" by {attrs['developer']}"
    if "platforms" in attrs:
        desc += f" for {attrs['platforms']}"
    return attrs, rng.choice(("Do you mean {n}, the {d}?", "Were you referring to {n}, the {d}?",
                              "You mean the {d}, {n}?")).format(n=game.name, d=desc)


def _describing(rng: random.Random, game: Game, options: Sequence[str], k_max: int) -> Attrs:
    """1 to k_max attributes of the game, for a noun phrase; multiplayer only where it has it."""
    usable = [a for a in options if a != "has_multiplayer" or game.has_multiplayer == "yes"]
    return {a: _fact(game, a, rng) for a in _pick(rng, usable, 1, k_max)}


def _suggest(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    attrs = {"name": game.name, **_describing(
        rng, game, ("release_year", "genres", "player_perspective", "has_multiplayer", "platforms"), 1)}
    return attrs, rng.choice(("Do you like other {g}, like {n}?", "Have you played any {g}, such as {n}?",
                              "Are you into {g}, for example {n}?")).format(g=_games(attrs), n=game.name)


def _recommend(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    attrs = {"name": game.name, **_describing(
        rng, game, ("developer", "esrb", "genres", "player_perspective", "has_multiplayer", "platforms"), 2)}
    return attrs, rng.choice(("If you like {g}, have you tried {n}?",
                              "Since you enjoy {g}, you might like {n}. Have you heard of it?",
                              "{n} could be a good pick if you are into {g}.")).format(g=_games(attrs), n=game.name)


def _request(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    attribute = rng.choice(("release_year", "developer", "genres", "player_perspective", "platforms"))
    value = rng.choice(game.genres) if attribute == "genres" else _fact(game, attribute, rng)
    attrs = {attribute: value, "specifier": rng.choice(SPECIFIERS)}
    return attrs, rng.choice(("Are there any {s} {g} you like?", "Do you know of any {s} {g}?",
                              "Can you think of any {s} {g}?")).format(s=attrs["specifier"], g=_games({attribute: value}))


def _request_explanation(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    rating = rng.choice(tuple(RATING_WORDS))
    attrs = {"rating": rating, **_describing(
        rng, game, ("release_year", "developer", "genres", "player_perspective", "has_multiplayer", "platforms"),
        2)}
    return attrs, rng.choice(("Why do you find {g} so {a}?", "What makes {g} {a} to you?",
                              "What is it about {g} that you find {a}?")).format(
        g=_games(attrs), a=_adj(rng, rating))


def _verify_attribute(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    rating = rng.choice(tuple(RATING_WORDS))
    attrs = {"name": game.name, "rating": rating, **_describing(
        rng, game, ("developer", "genres", "player_perspective", "has_multiplayer", "platforms"), 1)}
    others = _games({k: v for k, v in attrs.items() if k not in ("name", "rating")})
    return attrs, rng.choice(("You said {n} is {a}. Do you feel the same about other {g}?",
                              "Earlier you called {n} {a}. Is that how you see {g} in general?")).format(
        n=game.name, a=_adj(rng, rating), g=others)


def _request_attribute(rng: random.Random, game: Game) -> tuple[Attrs, str]:
    attribute = rng.choice(tuple(_REQUESTED))
    return {attribute: ""}, rng.choice(_REQUESTED[attribute])


_ACTS: dict[str, Callable[[random.Random, Game], tuple[Attrs, str]]] = {
    "inform": _inform, "give_opinion": _give_opinion, "verify_attribute": _verify_attribute,
    "request": _request, "recommend": _recommend, "request_explanation": _request_explanation,
    "confirm": _confirm, "suggest": _suggest, "request_attribute": _request_attribute,
}
