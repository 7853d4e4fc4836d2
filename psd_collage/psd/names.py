"""Layer names that mean something, and names that do not.

The naming conventions of docs/design.md section 1: which groups are our own output,
which text layers hold the prompts, and Photoshop's default layer names in every UI
language, which carry no meaning and so are never steered.
"""

from __future__ import annotations

import re

#: Name prefix of the groups a render adds; they are output, never input.
HARMONIZED_PREFIX = "[harmonized]"
#: Text layers with these names (any case) hold the prompts, not collage layers.
PROMPT_LAYER = "prompt"
NEGATIVE_LAYER = "negative"

# Photoshop's default layer names, per UI language, numbered ("Layer 1").
_NUMBERED_DEFAULTS = [
    # English
    "Layer", "Group", "Set", "Shape", "Ellipse", "Rectangle", "Rounded Rectangle",
    "Polygon", "Line", "Star", "Triangle", "Custom Shape", "Path", "Artboard", "Frame",
    "Color Fill", "Gradient Fill", "Pattern Fill", "Vector Smart Object",
    # German
    "Ebene", "Gruppe", "Form", "Rechteck", "Abgerundetes Rechteck", "Linie", "Stern",
    "Dreieck", "Eigene Form", "Zeichenfläche", "Rahmen", "Farbfüllung", "Verlaufsfüllung",
    "Musterfüllung", "Vektor-Smartobjekt",
    # French
    "Calque", "Groupe", "Forme", "Rectangle arrondi", "Polygone", "Ligne", "Étoile",
    "Forme personnalisée", "Plan de travail", "Cadre",
    # Spanish / Portuguese
    "Capa", "Grupo", "Forma", "Elipse", "Rectángulo", "Rectángulo redondeado", "Polígono",
    "Línea", "Estrella", "Triángulo", "Mesa de trabajo", "Marco", "Camada", "Retângulo",
    "Linha", "Prancheta",
    # Italian
    "Livello", "Gruppo", "Ellisse", "Rettangolo", "Rettangolo arrotondato", "Poligono",
    "Linea", "Stella", "Triangolo", "Tavola da disegno", "Cornice",
    # Dutch, Scandinavian, Finnish
    "Laag", "Groep", "Vorm", "Ellips", "Rechthoek", "Tekengebied", "Lager", "Grupp",
    "Rektangel", "Rityta", "Lag", "Figur", "Taso", "Ryhmä", "Muoto",
    # Polish, Czech, Hungarian, Turkish
    "Warstwa", "Grupa", "Kształt", "Elipsa", "Prostokąt", "Obszar roboczy", "Vrstva",
    "Skupina", "Tvar", "Obdélník", "Réteg", "Csoport", "Alakzat", "Katman", "Grup",
    "Şekil", "Elips", "Dikdörtgen", "Çalışma Yüzeyi",
    # Russian, Ukrainian
    "Слой", "Группа", "Фигура", "Эллипс", "Прямоугольник", "Многоугольник", "Линия",
    "Монтажная область", "Рамка", "Шар", "Група", "Фігура",
    # Japanese, Chinese, Korean
    "レイヤー", "グループ", "シェイプ", "楕円形", "長方形", "角丸長方形", "多角形", "ライン",
    "アートボード", "フレーム", "图层", "组", "形状", "椭圆", "矩形", "圆角矩形", "多边形",
    "直线", "画板", "圖層", "群組", "形狀", "橢圓", "工作區域", "레이어", "그룹", "모양",
    "타원", "사각형", "대지",
]  # fmt: skip
# Names Photoshop gives without a number.
_PLAIN_DEFAULTS = [
    "Background", "Hintergrund", "Arrière-plan", "Fondo", "Sfondo", "Plano de fundo",
    "Achtergrond", "Bakgrund", "Baggrund", "Bakgrunn", "Tausta", "Tło", "Pozadí", "Háttér",
    "Arka Plan", "Фон", "Тло", "背景", "배경", "Vector Smart Object", "Vektor-Smartobjekt",
]  # fmt: skip
_COPY_WORDS = [
    "copy", "kopie", "copie", "copia", "cópia", "kopia", "kopio", "kopya", "másolat",
    "копия", "копія", "のコピー", "コピー", "拷贝", "拷貝", "복사",
]  # fmt: skip


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_DEFAULT_NAME = re.compile(
    rf"^(?:(?:{_alternation(_NUMBERED_DEFAULTS)})\s*\d+|(?:{_alternation(_PLAIN_DEFAULTS)}))"
    rf"(?:\s*\(?(?:{_alternation(_COPY_WORDS)})\)?(?:\s*\d+)?)*$",
    re.IGNORECASE,
)


def is_default_name(caption: str) -> bool:
    """``Layer 1``, ``Background copy``, ``Ebene 2 Kopie``, ``レイヤー 1``... carry no meaning."""
    return bool(_DEFAULT_NAME.match(" ".join(caption.split())))


def clean_text(text: str) -> str:
    """Photoshop text: ``\\r`` line breaks and ``\\x03`` soft breaks -> one line."""
    return " ".join(re.sub(r"[\r\n\x03\u2028\u2029]+", " ", text).split())
