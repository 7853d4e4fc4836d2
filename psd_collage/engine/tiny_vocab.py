"""An offline CLIP tokenizer for the tiny random-weight models.

The real CLIP BPE vocabulary (49 408 tokens) cannot be downloaded here and no
light package ships it, so the tiny models get a real :class:`CLIPTokenizer`
(same normalisation, pre-tokenisation, byte-level BPE, ``</w>`` word ends and
special tokens) over a small vocabulary built here: every byte as a fallback,
plus merges that make each word of :data:`WORDS` a single token. The merges are
built greedily word by word, so a word that is a single token stays one when
later words add merges (later merges always rank lower).
"""

from __future__ import annotations

from functools import cache

from transformers import CLIPTokenizer

# Common English words and words typical of image captions, most common first.
_WORDS_TEXT = """
a an the and or of in on at to with without from by for over under near behind
above below between into onto through across around beside inside outside
front back top bottom left right middle center side up down out off
is are was be it its this that these those there here some many few all one
two three four five six seven eight nine ten first second last next other
very more most much less small big large tiny huge tall short long wide
narrow thin thick old new young little great high low full empty open closed
red green blue yellow orange purple pink brown black white gray grey gold
silver golden dark light bright pale deep warm cool cold hot soft hard
colorful vivid muted pastel neon transparent shiny glossy matte rusty wooden
metal metallic glass stone brick concrete paper plastic leather fabric cotton
wool silk velvet marble ceramic steel iron copper bronze crystal
man woman person people boy girl child children baby kid family friend
face head hair eye eyes hand hands arm leg foot body smile portrait
dog cat bird horse cow sheep pig chicken duck fish fox wolf bear lion tiger
elephant monkey rabbit deer owl eagle butterfly bee insect animal pet
tree trees flower flowers rose grass leaf leaves plant plants garden forest
wood woods bush field meadow park
sky cloud clouds sun sunset sunrise moon star stars night day morning evening
rain snow fog storm wind light shadow shadows
sea ocean water river lake beach sand wave waves shore island mountain
mountains hill hills valley desert rock rocks cliff cave ice
city town village street road bridge building buildings house home tower
castle church temple window door wall roof floor room kitchen bedroom office
shop store market station airport harbor
car cars truck bus train bike bicycle motorcycle boat ship plane airplane
vintage modern classic retro futuristic ancient antique rustic
table chair sofa couch bed lamp clock mirror shelf book books cup mug bottle
glass vase bowl plate box bag basket frame picture painting photo photograph
food fruit apple orange banana lemon cake bread coffee tea wine pizza
hat shirt dress coat jacket shoes boots glasses ring necklace
ball toy robot computer phone screen camera guitar piano
style art artist drawing sketch illustration render digital oil watercolor
acrylic pencil ink charcoal poster cartoon anime comic realistic
photorealistic cinematic dramatic beautiful detailed sharp focus blurry
bokeh lens shot closeup close view scene landscape background foreground
studio lighting natural sunlight golden hour soft hdr quality best high
resolution masterpiece trending render octane unreal engine
happy sad angry calm quiet peaceful busy lonely mysterious magical fantasy
dream surreal abstract minimal simple elegant cute funny scary
sitting standing walking running flying swimming sleeping reading holding
looking wearing playing eating drinking smiling jumping dancing
covered filled made painted lit
"""

#: The words that are single tokens of the tiny vocabulary.
WORDS: list[str] = _WORDS_TEXT.split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map of the 256 bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word (already split into symbols) with merge ``ranks``."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i)
            for i, (a, b) in enumerate(zip(word, word[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word[i : i + 2] = [word[i] + word[i + 1]]
    return word


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) in CLIP's file layout for a word list."""
    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]
    ranks: dict[tuple[str, str], int] = {}
    tokens: list[str] = []
    seen = set(base)
    for word in dict.fromkeys(words):  # unique, order kept
        encoded = word.encode("utf-8")
        table = bytes_to_unicode()
        symbols = [table[b] for b in encoded]
        symbols[-1] += "</w>"
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:  # chain the remaining pieces left to right with new merges
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(ranks)
                if pair[0] + pair[1] not in seen:
                    seen.add(pair[0] + pair[1])
                    tokens.append(pair[0] + pair[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    merges = [pair for pair, _ in sorted(ranks.items(), key=lambda item: item[1])]
    vocab_list = base + tokens + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_list)}, merges


@cache
def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return build_vocab(WORDS)


def build_tiny_tokenizer(
    model_max_length: int = 77, pad_token: str = "<|endoftext|>"
) -> CLIPTokenizer:
    """A real CLIPTokenizer over the tiny vocabulary; deterministic and offline.

    ``pad_token="!"`` gives the SDXL second-tokenizer flavour.
    """
    vocab, merges = _tiny_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
