"""A registry of protected names shared by the policy tests: works, characters, a public figure, in
several scripts, including short Latin and kana names that ordinary words contain."""

from __future__ import annotations

import datetime as dt

from farm.policy.registry import ProtectedEntry

_T = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)

NAMES: list[tuple[str, str, list[str]]] = [
    ("character", "ピカチュウ", ["Pikachu", "皮卡丘"]),
    ("character", "ドラえもん", ["Doraemon"]),
    ("work", "名探偵コナン", ["Detective Conan", "コナン"]),
    ("character", "Mario", ["マリオ"]),
    ("character", "Elsa", ["エルサ"]),
    ("character", "Ash", ["サトシ"]),
    ("work", "ゴジラ", ["Godzilla"]),
    ("character", "ガンダム", ["Gundam"]),
    ("character", "ハローキティ", ["Hello Kitty"]),
    ("work", "Pokémon", ["ポケモン", "ポケットモンスター"]),
    ("public_figure", "Taylor Swift", ["テイラー・スウィフト"]),
]


def entries() -> list[ProtectedEntry]:
    return [ProtectedEntry(f"pn_{i}", kind, name, "Holder", tuple(aliases), None, _T, _T)
            for i, (kind, name, aliases) in enumerate(NAMES)]


# Ordinary prompts, Japanese and English, some holding the registered short names inside other
# words (washing, cash, marionette, scenario, elsewhere, "a shark"): none names a protected entry.
ORDINARY = [
    "a red fox runs through fresh snow",
    "雪の森を走る赤いキツネ",
    "夕焼けの海辺を走る犬",
    "a woman washing dishes by a sunny window",
    "cash register drawer sliding open in a busy shop",
    "a marionette dancing on a small wooden stage",
    "a scenario where two robots play chess",
    "elsewhere, a lighthouse blinks in the fog",
    "a shark circles a coral reef, slow motion",
    "a flashlight beam sweeps across a dark attic",
    "猫がこたつで丸くなって眠る",
    "桜の下でピクニックをする家族",
    "東京タワーの夜景、タイムラプス",
    "ラーメンの湯気がゆっくり立ち上る",
    "a hot air balloon over Cappadocia at sunrise",
    "雨上がりの渋谷スクランブル交差点",
    "a kitten chasing a ball of yarn",
    "富士山と新幹線、青空",
    "a golden retriever catching a frisbee on the beach",
    "京都の竹林を歩く着物の女性",
    "a chef flipping pancakes in slow motion",
    "宇宙から見た地球の夜明け",
    "an old sailor mending a fishing net",
    "カフェでコーヒーを淹れるバリスタ",
    "a paper boat floating down a rainy street",
    "ペンギンの親子が氷の上を歩く",
    "the glass elevator rises above the city lights",
    "子どもたちが公園でシャボン玉を飛ばす",
    "a tiny dragon made of origami breathes confetti",
    "海の中を泳ぐウミガメとサンゴ礁",
    "a ballerina spinning on a rooftop at night",
    "ロボットが花に水をやる未来の庭",
    "marigolds swaying in a summer garden",
    "a pika (the small mountain mammal) gathers grass",
    "秋の紅葉とお寺の鐘",
    "dolphins leaping beside a sailboat, 4k",
    "「こんにちは」と手を振る少年、アニメ風",
    "a gundog retrieving a duck from the reeds",
    "ケーキ屋さんのショーケース、スローモーション",
    "an ice hotel in Sweden with glowing walls, a cashmere scarf on a chair",
]
