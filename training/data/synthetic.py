"""The built-in Taobao-like synthetic data set.

The generative story, and why each ingredient is there:

1. **Vocabularies.** About 40 e-commerce categories, each with 2-3 synonyms (sneakers / trainers /
   running shoes), 20 styles, colours with synonyms (red / crimson / scarlet), materials that fit
   the category's department, ~200 made-up brand names, and marketing noise ("free shipping").
   Synonyms matter: an item title and the query that led to it often name the same thing with
   different words, so exact token overlap is not enough and a text encoder has something to learn.
2. **Items.** Each item draws a category (category sizes are uneven), a brand among the few brands
   that sell that category, a style, a colour and a material; its title is a template over those
   attributes using a random category and colour synonym, sometimes wrapped in noise.
3. **Visual vector.** Sum of random prototype vectors for the item's category, colour and style
   plus gaussian noise, L2-normalised. It correlates with what a photo would show and is
   deliberately independent of the brand (you cannot see a logo-free brand), so a model that uses
   it must learn which attributes it carries.
4. **Popularity.** Zipf weights `1 / rank**zipf_exponent` over a random permutation of the items.
   Search result pages are sampled by popularity, so clicks are strongly skewed.
5. **Cold split.** `cold_item_fraction` of the items never appear in any click or exposure except
   as the *last* event of a user, i.e. a test target. Only content (text, visual) can rank them,
   which is what makes the warm-vs-cold comparison of an ID-based and a content-based model honest.
6. **Users.** Each user holds a few latent interests (category, preferred colour, preferred style).
   The active interest is sticky, switches with `switch_prob`, and with `drift_prob` one interest
   is replaced by a new one (taste drift), so recent history predicts better than old history.
7. **Events = search sessions.** The user types a query from the active interest (templates such as
   "{colour} {category}", with synonyms), sees `candidates_per_event` warm items of that category
   sampled by popularity and clicks the best match (colour/style/brand bonus + Gumbel noise).
   With `popularity_shortcut` the click instead goes to a globally popular warm item regardless of
   intent: this is the **ID shortcut**. Memorising popular item ids scores well on warm items and
   is tempting to a model, but it does nothing for cold items. Up to `exposed_per_event` of the
   other candidates are recorded as shown-but-not-clicked (hard negatives).
8. **Timestamps.** A per-user clock advancing by short in-session gaps, long between-session gaps
   and occasional zero gaps (ties). Events are written grouped by user, in chronological order, so
   a user's last row is their test event.

Everything is vectorised over users: the loop runs over the position `t` in the sequence and
handles all users that still have an event at `t` at once. One `numpy.random.default_rng(seed)`
drives every draw, in a fixed order, so the same config gives byte-identical arrays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from karma.config import SyntheticConfig
from karma.errors import ConfigError
from karma.progress import progress_bar
from training.data.schema import Catalog, Dataset, Interactions

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"

# --------------------------------------------------------------------------------------------
# Vocabularies. Canonical name first; synonyms are chosen so that no synonym is a whole-word
# phrase inside a synonym of another category (tests check query/category consistency by phrase).
# --------------------------------------------------------------------------------------------

# (department, synonyms); the department decides which materials make sense.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("footwear", ("sneakers", "trainers", "running shoes")),
    ("footwear", ("boots", "ankle boots", "booties")),
    ("footwear", ("sandals", "flip flops", "slides")),
    ("apparel", ("dress", "gown", "frock")),
    ("apparel", ("t-shirt", "tee", "graphic tee")),
    ("apparel", ("blouse", "button-down", "oxford shirt")),
    ("apparel", ("jeans", "denim jeans", "skinny jeans")),
    ("apparel", ("trousers", "pants", "slacks")),
    ("apparel", ("shorts", "bermudas", "board shorts")),
    ("apparel", ("skirt", "midi skirt", "mini skirt")),
    ("apparel", ("jacket", "coat", "outerwear")),
    ("apparel", ("hoodie", "sweatshirt", "pullover")),
    ("apparel", ("sweater", "jumper", "knitwear")),
    ("accessory", ("handbag", "purse", "tote")),
    ("accessory", ("backpack", "rucksack", "daypack")),
    ("accessory", ("wallet", "billfold", "card holder")),
    ("accessory", ("watch", "wristwatch", "timepiece")),
    ("accessory", ("sunglasses", "shades", "sunnies")),
    ("accessory", ("hat", "cap", "beanie")),
    ("accessory", ("scarf", "shawl", "muffler")),
    ("accessory", ("belt", "waistband")),
    ("accessory", ("necklace", "pendant", "chain")),
    ("accessory", ("earrings", "studs", "ear drops")),
    ("electronics", ("phone case", "phone cover", "mobile case")),
    ("electronics", ("headphones", "earphones", "earbuds")),
    ("electronics", ("smartwatch", "fitness tracker", "smart band")),
    ("electronics", ("charger", "power adapter", "charging cable")),
    ("electronics", ("power bank", "battery pack", "external battery")),
    ("electronics", ("keyboard", "mechanical keyboard")),
    ("electronics", ("mouse", "wireless mouse", "computer mouse")),
    ("home", ("desk lamp", "table lamp", "reading light")),
    ("home", ("mug", "coffee cup", "tumbler")),
    ("home", ("water bottle", "flask", "sports bottle")),
    ("home", ("cushion", "throw pillow", "pillow")),
    ("home", ("blanket", "quilt", "comforter")),
    ("home", ("curtains", "drapes", "window panels")),
    ("home", ("bedsheet", "bed linen", "sheet set")),
    ("beauty", ("lipstick", "lip gloss", "lip tint")),
    ("beauty", ("perfume", "fragrance", "eau de parfum")),
    ("sport", ("yoga mat", "exercise mat", "fitness mat")),
    ("sport", ("dumbbells", "hand weights", "free weights")),
    ("home", ("umbrella", "parasol", "rain umbrella")),
)

COLOURS: tuple[tuple[str, ...], ...] = (
    ("red", "crimson", "scarlet"),
    ("pink", "rose", "blush"),
    ("orange", "tangerine", "apricot"),
    ("yellow", "mustard", "lemon"),
    ("green", "emerald", "forest green"),
    ("olive", "army green", "khaki green"),
    ("blue", "azure", "cobalt"),
    ("navy", "navy blue", "midnight blue"),
    ("sky blue", "light blue", "baby blue"),
    ("purple", "violet", "lavender"),
    ("brown", "chocolate", "tan"),
    ("black", "jet black", "ebony"),
    ("white", "ivory", "snow white"),
    ("grey", "gray", "charcoal"),
    ("silver", "metallic silver"),
    ("gold", "golden"),
    ("beige", "cream", "camel"),
    ("burgundy", "wine red", "maroon"),
    ("teal", "turquoise", "aqua"),
    ("multicolour", "rainbow", "colourful"),
)

STYLES: tuple[str, ...] = (
    "casual", "elegant", "vintage", "minimalist", "classic", "sporty", "retro", "boho", "streetwear",
    "luxury", "korean style", "preppy", "punk", "outdoor", "business", "cute", "y2k", "oversized",
    "slim fit", "cozy",
)  # fmt: skip

MATERIALS_BY_DEPARTMENT: dict[str, tuple[str, ...]] = {
    "apparel": ("cotton", "linen", "wool", "polyester", "silk", "cashmere", "nylon"),
    "footwear": ("leather", "suede", "canvas", "mesh", "rubber"),
    "accessory": ("leather", "canvas", "stainless steel", "titanium", "nylon", "silk"),
    "electronics": ("plastic", "aluminium", "silicone"),
    "home": ("ceramic", "cotton", "linen", "bamboo", "glass", "wool", "stainless steel"),
    "beauty": ("organic", "vegan", "natural"),
    "sport": ("rubber", "foam", "neoprene", "stainless steel", "nylon"),
}

NOISE: tuple[str, ...] = (
    "2026 new", "free shipping", "hot sale", "limited edition", "official store", "best seller",
    "new arrival", "flash deal", "authentic", "gift idea",
)  # fmt: skip

BRAND_SYLLABLES: tuple[str, ...] = (
    "ka", "lo", "mi", "ra", "zen", "tor", "vi", "na", "qui", "shi", "ya", "do", "fe", "lu", "mo",
    "xi", "an", "bo", "ri", "su", "ta", "el", "ven", "or", "pax", "ly", "dor", "ko", "ne", "sa",
)  # fmt: skip

N_BRANDS = 200
BRAND_CATEGORIES = (1, 4)  # each brand sells between 1 and 4 (exclusive) categories

TITLE_TEMPLATES: tuple[str, ...] = (
    "{brand} {colour} {style} {material} {category}",
    "{brand} {category} {colour} {material}",
    "{style} {colour} {category} by {brand}",
    "{brand} {material} {style} {category} - {colour}",
    "{colour} {category} {brand} {style}",
)
TITLE_PREFIX_PROB = 0.3
TITLE_SUFFIX_PROB = 0.15

# (template, probability, mentions colour, mentions style, mentions brand)
QUERY_TEMPLATES: tuple[tuple[str, float, bool, bool, bool], ...] = (
    ("{category}", 0.22, False, False, False),
    ("{colour} {category}", 0.25, True, False, False),
    ("{style} {category}", 0.18, False, True, False),
    ("{brand} {category}", 0.12, False, False, True),
    ("{colour} {style} {category}", 0.13, True, True, False),
    ("{category} {colour}", 0.06, True, False, False),
    ("{brand}", 0.04, False, False, True),
)

# Click utility: latent taste + extra weight for what the query spelled out + Gumbel(0, 1) noise.
COLOUR_BONUS = 1.5
STYLE_BONUS = 1.0
MENTION_BONUS = 1.5
BRAND_BONUS = 2.0

# Visual vector: weights of the prototype components and of the noise.
VISUAL_WEIGHTS = {"category": 1.0, "colour": 0.7, "style": 0.5, "noise": 0.7}

# Events per user: 3 + multinomial share of the rest with lognormal(0, sigma) weights.
MIN_EVENTS = 3
LENGTH_SIGMA = 1.0

# Clock: epoch start, spread of user start times, gaps.
EPOCH_START = 1_767_225_600  # 2026-01-01T00:00:00Z
START_SPREAD_S = 60 * 86_400
TIE_PROB = 0.05
SESSION_BREAK_PROB = 0.25
IN_SESSION_LOG_MEAN, IN_SESSION_LOG_SIGMA = 4.0, 1.0  # ~1 minute
SESSION_GAP_MEAN_S = 86_400.0


# --------------------------------------------------------------------------------------------
# Vocabulary tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """Flat string tables plus CSR offsets, so that attribute draws are pure integer arithmetic."""

    category_names: np.ndarray  # (n_cat,) canonical
    category_syn: np.ndarray  # flat synonyms; category c owns [category_syn_start[c], +count)
    category_syn_start: np.ndarray
    category_syn_count: np.ndarray
    colour_names: np.ndarray
    colour_syn: np.ndarray
    colour_syn_start: np.ndarray
    colour_syn_count: np.ndarray
    styles: np.ndarray
    materials: np.ndarray
    category_material_start: np.ndarray  # category c may use materials[category_material_list[...]]
    category_material_count: np.ndarray
    category_material_list: np.ndarray
    brands: np.ndarray
    category_brand_start: np.ndarray  # brands selling category c: category_brand_list[start:start+count]
    category_brand_count: np.ndarray
    category_brand_list: np.ndarray

    @property
    def n_categories(self) -> int:
        return len(self.category_names)


def _csr(groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, count, flat) for a list of integer lists."""
    count = np.array([len(g) for g in groups], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    flat = np.array([x for g in groups for x in g], dtype=np.int64)
    return start, count, flat


def _synonym_table(entries: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Canonical names and a flat synonym table (canonical included) with CSR offsets."""
    names = np.array([e[0] for e in entries], dtype=object)
    flat_ids: list[list[int]] = []
    flat: list[str] = []
    for entry in entries:
        flat_ids.append(list(range(len(flat), len(flat) + len(entry))))
        flat.extend(entry)
    start, count, _ = _csr(flat_ids)
    return names, np.array(flat, dtype=object), start, count


def _brand_names(rng: np.random.Generator, n: int, reserved: set[str]) -> np.ndarray:
    """`n` unique made-up brand names from 2-3 syllables, none equal to a vocabulary word."""
    names: list[str] = []
    seen = set(reserved)
    while len(names) < n:
        k = int(rng.integers(2, 4))
        name = "".join(BRAND_SYLLABLES[i] for i in rng.integers(0, len(BRAND_SYLLABLES), k)).capitalize()
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return np.array(names, dtype=object)


def _brand_categories(rng: np.random.Generator, n_brands: int, category_p: np.ndarray) -> list[list[int]]:
    """Per category, the brands that sell it: every brand sells a few categories, every category has a brand."""
    n_cat = len(category_p)
    by_category: list[list[int]] = [[] for _ in range(n_cat)]
    for brand in range(n_brands):
        k = int(rng.integers(*BRAND_CATEGORIES))
        for c in rng.choice(n_cat, size=min(k, n_cat), replace=False, p=category_p):
            by_category[int(c)].append(brand)
    for c in range(n_cat):
        if not by_category[c]:
            by_category[c].append(int(rng.integers(0, n_brands)))
    return [sorted(b) for b in by_category]


def build_vocab(rng: np.random.Generator, category_p: np.ndarray) -> Vocab:
    """Fixed attribute vocabularies plus seed-dependent brand names and brand-category ties."""
    cat_names, cat_syn, cat_start, cat_count = _synonym_table([syn for _, syn in CATEGORIES])
    col_names, col_syn, col_start, col_count = _synonym_table(list(COLOURS))
    materials = sorted({m for ms in MATERIALS_BY_DEPARTMENT.values() for m in ms})
    mat_index = {m: i for i, m in enumerate(materials)}
    mat_start, mat_count, mat_list = _csr([[mat_index[m] for m in MATERIALS_BY_DEPARTMENT[d]] for d, _ in CATEGORIES])
    reserved = {w for s in [*cat_syn, *col_syn, *STYLES, *materials, *NOISE] for w in s.lower().split()}
    brands = _brand_names(rng, N_BRANDS, reserved)
    br_start, br_count, br_list = _csr(_brand_categories(rng, N_BRANDS, category_p))
    return Vocab(
        category_names=cat_names,
        category_syn=cat_syn,
        category_syn_start=cat_start,
        category_syn_count=cat_count,
        colour_names=col_names,
        colour_syn=col_syn,
        colour_syn_start=col_start,
        colour_syn_count=col_count,
        styles=np.array(STYLES, dtype=object),
        materials=np.array(materials, dtype=object),
        category_material_start=mat_start,
        category_material_count=mat_count,
        category_material_list=mat_list,
        brands=brands,
        category_brand_start=br_start,
        category_brand_count=br_count,
        category_brand_list=br_list,
    )


def _pick_in_group(rng: np.random.Generator, start: np.ndarray, count: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Uniform index into the CSR slice of each `group` entry (flat position, not the value)."""
    return start[group] + (rng.random(group.shape) * count[group]).astype(np.int64)


def _brand_slot(rng: np.random.Generator, vocab: Vocab, category: np.ndarray) -> np.ndarray:
    """Position in `category_brand_list` of a uniformly chosen brand that sells each category."""
    return _pick_in_group(rng, vocab.category_brand_start, vocab.category_brand_count, category)


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Items:
    """Integer attributes of every item (row = item index)."""

    category: np.ndarray
    colour: np.ndarray
    style: np.ndarray
    material: np.ndarray
    brand: np.ndarray
    popularity: np.ndarray  # float64 Zipf weight
    cold: np.ndarray  # bool


def _draw_items(rng: np.random.Generator, cfg: SyntheticConfig, vocab: Vocab, category_p: np.ndarray) -> Items:
    """Attributes, Zipf popularity over a random permutation, and the cold flag."""
    n = cfg.n_items
    category = rng.choice(vocab.n_categories, size=n, p=category_p).astype(np.int64)
    colour = rng.integers(0, len(vocab.colour_names), n)
    style = rng.integers(0, len(vocab.styles), n)
    material = vocab.category_material_list[
        _pick_in_group(rng, vocab.category_material_start, vocab.category_material_count, category)
    ]
    brand = vocab.category_brand_list[_brand_slot(rng, vocab, category)]
    rank = np.empty(n, dtype=np.int64)
    rank[rng.permutation(n)] = np.arange(1, n + 1)
    popularity = 1.0 / rank.astype(np.float64) ** cfg.zipf_exponent
    n_cold = min(round(cfg.cold_item_fraction * n), n - 1)
    cold = np.zeros(n, dtype=bool)
    cold[rng.choice(n, size=n_cold, replace=False)] = True
    return Items(category, colour, style, material, brand, popularity, cold)


def _titles(rng: np.random.Generator, items: Items, vocab: Vocab) -> list[str]:
    """Template titles with a random category/colour synonym and occasional marketing noise."""
    n = len(items.category)
    syn_slot = _pick_in_group(rng, vocab.category_syn_start, vocab.category_syn_count, items.category)
    cat_syn = vocab.category_syn[syn_slot]
    col_syn = vocab.colour_syn[_pick_in_group(rng, vocab.colour_syn_start, vocab.colour_syn_count, items.colour)]
    template = rng.integers(0, len(TITLE_TEMPLATES), n)
    noise = np.array(["", *NOISE], dtype=object)
    prefix = np.where(rng.random(n) < TITLE_PREFIX_PROB, rng.integers(1, len(noise), n), 0)
    suffix = np.where(rng.random(n) < TITLE_SUFFIX_PROB, rng.integers(1, len(noise), n), 0)
    prefixes = np.array([p + " " if p else "" for p in noise], dtype=object)[prefix]
    suffixes = np.array([" " + s if s else "" for s in noise], dtype=object)[suffix]
    columns = zip(
        template.tolist(),
        prefixes.tolist(),
        suffixes.tolist(),
        vocab.brands[items.brand].tolist(),
        col_syn.tolist(),
        vocab.styles[items.style].tolist(),
        vocab.materials[items.material].tolist(),
        cat_syn.tolist(),
        strict=True,
    )
    return [
        pre + TITLE_TEMPLATES[t].format(brand=b, colour=c, style=s, material=m, category=k) + suf
        for t, pre, suf, b, c, s, m, k in columns
    ]


def _visual(rng: np.random.Generator, items: Items, vocab: Vocab, dim: int) -> np.ndarray:
    """Prototype sum for category, colour and style plus noise; brand deliberately absent."""
    scale = np.float32(1.0 / np.sqrt(dim))
    w = VISUAL_WEIGHTS
    proto_cat = rng.standard_normal((vocab.n_categories, dim), dtype=np.float32) * scale
    proto_col = rng.standard_normal((len(vocab.colour_names), dim), dtype=np.float32) * scale
    proto_sty = rng.standard_normal((len(vocab.styles), dim), dtype=np.float32) * scale
    vec = rng.standard_normal((len(items.category), dim), dtype=np.float32)
    vec *= np.float32(w["noise"]) * scale
    vec += np.float32(w["category"]) * proto_cat[items.category]
    vec += np.float32(w["colour"]) * proto_col[items.colour]
    vec += np.float32(w["style"]) * proto_sty[items.style]
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), np.float32(1e-12))
    return vec


def _catalog(rng: np.random.Generator, items: Items, vocab: Vocab, cfg: SyntheticConfig) -> Catalog:
    """The `Catalog`: ids, title and canonical attribute columns, visual vectors, cold flags."""
    n = cfg.n_items
    width = max(7, len(str(n - 1)))
    frame = pd.DataFrame(
        {
            "item_id": [f"i{i:0{width}d}" for i in range(n)],
            "title": _titles(rng, items, vocab),
            "category": vocab.category_names[items.category].tolist(),
            "style": vocab.styles[items.style].tolist(),
            "material": vocab.materials[items.material].tolist(),
            "colour": vocab.colour_names[items.colour].tolist(),
            "brand": vocab.brands[items.brand].tolist(),
        }
    )
    visual = _visual(rng, items, vocab, cfg.visual_dim)
    # Real catalogs carry title, category and brand as fields; colour/style/material live in the title.
    return Catalog(items=frame, text_fields=("title", "category", "brand"), visual=visual, cold=items.cold.copy())


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupedSampler:
    """Popularity-weighted sampling of items within a group (category), all groups in one array.

    Items are sorted by group; `cdf` holds `group + cumulative share within group`, so one
    `searchsorted` on `group + u` samples every row from its own group.
    """

    order: np.ndarray  # item indices sorted by group
    cdf: np.ndarray
    start: np.ndarray  # (n_groups,) first position of each group in `order`
    count: np.ndarray  # (n_groups,) eligible items per group

    @classmethod
    def build(cls, group: np.ndarray, weight: np.ndarray, eligible: np.ndarray, n_groups: int) -> GroupedSampler:
        idx = np.flatnonzero(eligible)
        idx = idx[np.argsort(group[idx], kind="stable")]
        g = group[idx]
        count = np.bincount(g, minlength=n_groups).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        cum = np.cumsum(weight[idx])
        before = np.concatenate([[0.0], cum])[start]  # cumulative weight before each group
        total = np.bincount(g, weights=weight[idx], minlength=n_groups)
        within = (cum - before[g]) / total[g]
        nonempty = count > 0
        within[start[nonempty] + count[nonempty] - 1] = 1.0  # exact group ends despite rounding
        return cls(order=idx, cdf=g + within, start=start, count=count)

    def has(self, group: np.ndarray) -> np.ndarray:
        """Whether each group has at least one eligible item."""
        return self.count[group] > 0

    def sample(self, rng: np.random.Generator, group: np.ndarray, k: int) -> np.ndarray:
        """(len(group), k) item indices, with replacement; every group must be non-empty."""
        u = rng.random((len(group), k))
        pos = np.searchsorted(self.cdf, group[:, None] + u, side="right")
        pos = np.clip(pos, self.start[group][:, None], (self.start[group] + self.count[group] - 1)[:, None])
        return self.order[pos]


# --------------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------------


@dataclass
class UserState:
    """Latent interests of every user; slots beyond `n_interests[u]` are unused."""

    category: np.ndarray  # (n_users, max_interests)
    colour: np.ndarray
    style: np.ndarray
    n_interests: np.ndarray  # (n_users,)
    active: np.ndarray  # (n_users,) current slot

    def intent(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        slot = self.active[users]
        return self.category[users, slot], self.colour[users, slot], self.style[users, slot]


def _event_counts(rng: np.random.Generator, n_users: int, n_events: int) -> np.ndarray:
    """Heavy-tailed events per user: at least MIN_EVENTS, total max(n_events, MIN_EVENTS * n_users)."""
    extra = max(n_events - MIN_EVENTS * n_users, 0)
    weight = rng.lognormal(0.0, LENGTH_SIGMA, n_users)
    return MIN_EVENTS + rng.multinomial(extra, weight / weight.sum()).astype(np.int64)


def _draw_interests(
    rng: np.random.Generator, shape: tuple[int, ...], interest_p: np.ndarray, n_colours: int, n_styles: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New (category, colour, style) interests; categories only where warm items exist."""
    category = rng.choice(len(interest_p), size=shape, p=interest_p).astype(np.int64)
    return category, rng.integers(0, n_colours, shape), rng.integers(0, n_styles, shape)


def _init_users(rng: np.random.Generator, cfg: SyntheticConfig, interest_p: np.ndarray, vocab: Vocab) -> UserState:
    """Every user gets `interests_per_user` latent interests and starts on a random one."""
    lo, hi = cfg.interests_per_user
    n = cfg.n_users
    category, colour, style = _draw_interests(rng, (n, hi), interest_p, len(vocab.colour_names), len(vocab.styles))
    n_interests = rng.integers(lo, hi + 1, n)
    active = (rng.random(n) * n_interests).astype(np.int64)
    return UserState(category, colour, style, n_interests, active)


def _switch_interests(rng: np.random.Generator, state: UserState, users: np.ndarray, p: float) -> None:
    """With probability `p` move each user to a different one of their interests (sticky intent)."""
    n = state.n_interests[users]
    switch = (rng.random(len(users)) < p) & (n > 1)
    u, n = users[switch], n[switch]
    step = 1 + (rng.random(len(u)) * (n - 1)).astype(np.int64)
    state.active[u] = (state.active[u] + step) % n


def _drift_interests(
    rng: np.random.Generator, state: UserState, users: np.ndarray, p: float, interest_p: np.ndarray, vocab: Vocab
) -> None:
    """With probability `p` replace one random interest slot of each user by a fresh interest (taste drift)."""
    u = users[rng.random(len(users)) < p]
    slot = (rng.random(len(u)) * state.n_interests[u]).astype(np.int64)
    cat, col, sty = _draw_interests(rng, (len(u),), interest_p, len(vocab.colour_names), len(vocab.styles))
    state.category[u, slot], state.colour[u, slot], state.style[u, slot] = cat, col, sty


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryParts:
    """Integer description of each query; strings are built once, after the loop."""

    template: np.ndarray
    category_syn: np.ndarray  # flat index into vocab.category_syn
    colour_syn: np.ndarray  # flat index into vocab.colour_syn
    style: np.ndarray
    brand: np.ndarray


def _draw_queries(
    rng: np.random.Generator, vocab: Vocab, category: np.ndarray, colour: np.ndarray, style: np.ndarray
) -> QueryParts:
    """A query from the intent, with synonyms drawn independently of the item titles."""
    probs = np.array([q[1] for q in QUERY_TEMPLATES])
    template = rng.choice(len(QUERY_TEMPLATES), size=len(category), p=probs / probs.sum())
    cat_syn = _pick_in_group(rng, vocab.category_syn_start, vocab.category_syn_count, category)
    col_syn = _pick_in_group(rng, vocab.colour_syn_start, vocab.colour_syn_count, colour)
    brand = vocab.category_brand_list[_brand_slot(rng, vocab, category)]
    return QueryParts(template, cat_syn, col_syn, style, brand)


def _choose_clicks(
    rng: np.random.Generator,
    items: Items,
    candidates: np.ndarray,
    colour: np.ndarray,
    style: np.ndarray,
    query: QueryParts,
) -> np.ndarray:
    """Click the candidate with the best intent match + Gumbel noise (a multinomial-logit choice)."""
    mentions = np.array([q[2:] for q in QUERY_TEMPLATES], dtype=bool)[query.template]  # colour, style, brand
    colour_w = COLOUR_BONUS + MENTION_BONUS * mentions[:, 0]
    style_w = STYLE_BONUS + MENTION_BONUS * mentions[:, 1]
    brand_w = BRAND_BONUS * mentions[:, 2]
    score = colour_w[:, None] * (items.colour[candidates] == colour[:, None])
    score += style_w[:, None] * (items.style[candidates] == style[:, None])
    score += brand_w[:, None] * (items.brand[candidates] == query.brand[:, None])
    score += rng.gumbel(size=candidates.shape)
    return candidates[np.arange(len(candidates)), np.argmax(score, axis=1)]


def _exposed(candidates: np.ndarray, clicked: np.ndarray, k: int) -> np.ndarray:
    """(n, k) shown-but-not-clicked items, -1 padded: first distinct candidates other than the click."""
    n, c = candidates.shape
    order = np.argsort(candidates, axis=1, kind="stable")
    ordered = np.take_along_axis(candidates, order, axis=1)
    first_ordered = np.ones((n, c), dtype=bool)
    first_ordered[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.empty_like(first_ordered)
    np.put_along_axis(first, order, first_ordered, axis=1)
    keep = first & (candidates != clicked[:, None])
    rank = np.cumsum(keep, axis=1) - 1
    keep &= rank < k
    out = np.full((n, k), -1, dtype=np.int32)
    rows, cols = np.nonzero(keep)
    out[rows, rank[rows, cols]] = candidates[rows, cols]
    return out


def _gaps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds to the next event: ties, short in-session gaps and long between-session gaps."""
    u = rng.random(n)
    short = rng.lognormal(IN_SESSION_LOG_MEAN, IN_SESSION_LOG_SIGMA, n)
    long = rng.exponential(SESSION_GAP_MEAN_S, n)
    gap = np.where(u < TIE_PROB, 0.0, np.where(u < TIE_PROB + SESSION_BREAK_PROB, long, short))
    return np.ceil(gap).astype(np.int64)


@dataclass
class EventLog:
    """Preallocated per-event columns in final order (user-major, chronological)."""

    item: np.ndarray
    timestamp: np.ndarray
    exposed: np.ndarray  # (n_events, exposed_per_event) int32, -1 padded
    q_template: np.ndarray
    q_category: np.ndarray
    q_colour: np.ndarray
    q_style: np.ndarray
    q_brand: np.ndarray
    shortcut: np.ndarray  # bool, for the stats in `meta`

    @classmethod
    def empty(cls, n: int, k: int) -> EventLog:
        def ints(dtype: type) -> np.ndarray:
            return np.zeros(n, dtype=dtype)

        return cls(
            item=ints(np.int32),
            timestamp=ints(np.int64),
            exposed=np.full((n, k), -1, dtype=np.int32),
            q_template=ints(np.int8),
            q_category=ints(np.int16),
            q_colour=ints(np.int16),
            q_style=ints(np.int16),
            q_brand=ints(np.int16),
            shortcut=ints(np.bool_),
        )


def _simulate(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    vocab: Vocab,
    items: Items,
    lengths: np.ndarray,
    progress: bool,
) -> EventLog:
    """Run all users' search sessions, vectorised over users, looping over the position t."""
    n_cat = vocab.n_categories
    warm = GroupedSampler.build(items.category, items.popularity, ~items.cold, n_cat)
    cold = GroupedSampler.build(items.category, items.popularity, items.cold, n_cat)
    zeros = np.zeros(len(items.category), dtype=np.int64)
    popular = GroupedSampler.build(zeros, items.popularity, ~items.cold, 1)
    cold_any = GroupedSampler.build(zeros, items.popularity, items.cold, 1)

    interest_p = np.bincount(items.category[~items.cold], minlength=n_cat).astype(np.float64)
    interest_p /= interest_p.sum()
    users = _init_users(rng, cfg, interest_p, vocab)
    cold_users = np.zeros(cfg.n_users, dtype=bool)
    if items.cold.any():
        cold_users[rng.choice(cfg.n_users, size=round(cfg.cold_test_fraction * cfg.n_users), replace=False)] = True

    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.argsort(-lengths, kind="stable")  # active users at t are a prefix of this order
    neg_sorted = -lengths[order]
    clock = EPOCH_START + rng.integers(0, START_SPREAD_S, cfg.n_users)
    log = EventLog.empty(int(lengths.sum()), cfg.exposed_per_event)

    with progress_bar(total=int(lengths.sum()), desc="synthetic events", unit="ev", disable=not progress) as bar:
        for t in range(int(lengths.max())):
            active = order[: np.searchsorted(neg_sorted, -t, side="left")]
            if t > 0:
                _switch_interests(rng, users, active, cfg.switch_prob)
                _drift_interests(rng, users, active, cfg.drift_prob, interest_p, vocab)
                clock[active] += _gaps(rng, len(active))
            category, colour, style = users.intent(active)
            query = _draw_queries(rng, vocab, category, colour, style)
            candidates = warm.sample(rng, category, cfg.candidates_per_event)
            clicked = _choose_clicks(rng, items, candidates, colour, style, query)

            shortcut = rng.random(len(active)) < cfg.popularity_shortcut
            cold_target = cold_users[active] & (lengths[active] == t + 1)
            shortcut &= ~cold_target
            clicked[shortcut] = popular.sample(rng, np.zeros(int(shortcut.sum()), dtype=np.int64), 1)[:, 0]
            clicked[cold_target] = _cold_targets(rng, cold, cold_any, category[cold_target])

            ev = offsets[active] + t
            log.item[ev] = clicked
            log.timestamp[ev] = clock[active]
            log.exposed[ev] = _exposed(candidates, clicked, cfg.exposed_per_event)
            log.q_template[ev], log.q_category[ev] = query.template, query.category_syn
            log.q_colour[ev], log.q_style[ev], log.q_brand[ev] = query.colour_syn, query.style, query.brand
            log.shortcut[ev] = shortcut
            bar.update(len(active))
    return log


def _cold_targets(
    rng: np.random.Generator, cold: GroupedSampler, cold_any: GroupedSampler, category: np.ndarray
) -> np.ndarray:
    """A popular cold item of the intent category, or any popular cold item if that category has none."""
    out = np.empty(len(category), dtype=np.int64)
    match = cold.has(category)
    out[match] = cold.sample(rng, category[match], 1)[:, 0]
    out[~match] = cold_any.sample(rng, np.zeros(int((~match).sum()), dtype=np.int64), 1)[:, 0]
    return out


def _query_strings(log: EventLog, vocab: Vocab) -> np.ndarray:
    """Render the integer query parts into an object array of str."""
    templates = [q[0] for q in QUERY_TEMPLATES]
    columns = zip(
        log.q_template.tolist(),
        vocab.category_syn[log.q_category].tolist(),
        vocab.colour_syn[log.q_colour].tolist(),
        vocab.styles[log.q_style].tolist(),
        vocab.brands[log.q_brand].tolist(),
        strict=True,
    )
    out = np.empty(len(log.item), dtype=object)
    out[:] = [templates[t].format(category=k, colour=c, style=s, brand=b) for t, k, c, s, b in columns]
    return out


def _exposed_csr(exposed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-1 padded matrix -> (offsets int64, flat int32) as `Interactions` stores them."""
    mask = exposed >= 0
    offsets = np.zeros(len(exposed) + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=offsets[1:])
    return offsets, exposed[mask].astype(np.int32)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_config(cfg: SyntheticConfig) -> None:
    """Reject combinations the field validators cannot see on their own."""
    lo, hi = cfg.interests_per_user
    if not 1 <= lo <= hi:
        raise ConfigError(f"data.synthetic.interests_per_user: need 1 <= min <= max, got {cfg.interests_per_user}")


def _category_weights(rng: np.random.Generator) -> np.ndarray:
    """Uneven category sizes (some departments are much bigger than others), never zero."""
    p = rng.dirichlet(np.full(len(CATEGORIES), 2.0))
    p = 0.9 * p + 0.1 / len(p)
    return p / p.sum()


def generate_synthetic(cfg: SyntheticConfig, progress: bool = True) -> Dataset:
    """Generate the Taobao-like data set described in the module docstring; deterministic by `cfg.seed`."""
    _check_config(cfg)
    rng = np.random.default_rng(cfg.seed)
    logger.info(
        "synthetic: generating %d items, %d users, ~%d events (seed %d)",
        cfg.n_items, cfg.n_users, cfg.n_events, cfg.seed,
    )  # fmt: skip
    category_p = _category_weights(rng)
    vocab = build_vocab(rng, category_p)
    items = _draw_items(rng, cfg, vocab, category_p)
    catalog = _catalog(rng, items, vocab, cfg)
    logger.info("synthetic: catalog ready, %d cold items (%.1f%%)", items.cold.sum(), 100 * items.cold.mean())

    lengths = _event_counts(rng, cfg.n_users, cfg.n_events)
    logger.info(
        "synthetic: %d events, per user min %d / median %d / max %d",
        lengths.sum(), lengths.min(), int(np.median(lengths)), lengths.max(),
    )  # fmt: skip
    log = _simulate(rng, cfg, vocab, items, lengths, progress)
    query = _query_strings(log, vocab)
    exposed_offsets, exposed_items = _exposed_csr(log.exposed)

    width = max(7, len(str(cfg.n_users - 1)))
    interactions = Interactions(
        user_ids=np.array([f"u{u:0{width}d}" for u in range(cfg.n_users)], dtype=object),
        user_idx=np.repeat(np.arange(cfg.n_users, dtype=np.int32), lengths),
        item_idx=log.item,
        timestamp=log.timestamp,
        query=query,
        exposed_offsets=exposed_offsets,
        exposed_items=exposed_items,
    )
    n_cold_targets = int(items.cold[log.item].sum())
    stats = {
        "n_events": int(interactions.n_events),
        "n_cold_items": int(items.cold.sum()),
        "n_cold_targets": n_cold_targets,
        "shortcut_clicks": int(log.shortcut.sum()),
        "max_events_per_user": int(lengths.max()),
    }
    logger.info("synthetic: done: %s", stats)
    meta = {"generator_version": GENERATOR_VERSION, "config": cfg.model_dump(mode="json"), "stats": stats}
    return Dataset(name="synthetic", catalog=catalog, interactions=interactions, meta=meta)
