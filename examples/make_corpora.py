#!/usr/bin/env python3
"""Generate the example corpora and question sets shipped with `cart`.

Two small, fact-dense corpora of *invented* facts are written, each with a
question set whose reference answers are known exactly:

* ``orbital/``  -- the crew handbook of the fictional "Orbital Freight
  Cooperative" (stations, ships, captains, cargo codes, fuel rules, procedures);
* ``meridian/`` -- the municipal almanac of the fictional city of "Meridian
  Falls" (districts, bridges, mayors, festivals, libraries, trams, parks);
* ``cross/``    -- questions that can only be answered by combining both
  corpora (a ship named after a bridge, a mayor who used to captain a ship...).

Every fact lives in exactly one table below (dataclasses and dicts).  The
prose is rendered from those tables through sentence templates, and the
questions are built from the *same* table entries, so a question and the
sentence that answers it can never disagree.

The script is deterministic: a fixed seed drives the only randomness (choice
of sentence template and order of multiple-choice options), no timestamps are
written, and running it again produces byte-identical files.  After
generating, it checks itself and exits non-zero if any check fails:

* every reference answer appears verbatim in its corpus (in the section the
  question is about); for cross questions, in the union of both corpora;
* for multiple-choice questions, the correct option's text appears there;
* for cross questions, each corpus holds a linking fact the other lacks;
* the questions of each corpus are spread over its beginning, middle and end.

Usage::

    python examples/make_corpora.py            # (re)write the files
    python examples/make_corpora.py --check    # verify; fail if the files on disk differ

Standard library only; no network access.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20_241
SCHEMA = "cart.questions/1"
HERE = Path(__file__).resolve().parent
LETTERS = "ABCD"
QUESTION_COUNTS = {"orbital": (30, 40), "meridian": (30, 40), "cross": (8, 12)}
WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


# --------------------------------------------------------------------------
# Orbital Freight Cooperative: fact tables
# --------------------------------------------------------------------------

COOP = {
    "name": "Orbital Freight Cooperative",
    "short": "OFC",
    "founded": "14 March 2187",
    "founded_at": "Kessler Anchorage",
    "founders": ("Ilsabet Varga-Onu", "Teodor Marchetti-Quay"),
    "founding_tugs": "four",
    "charter": "Charter 5512",
    "registry": "Lunar Commerce Registry",
    "hq": "Tycho Ring Station",
    "hq_moved": "2193",
    "motto": "Every Kilogram Accounted For",
    "crews": "318",
    "dues": "2.5 percent",
    "assembly": "Assembly of Holds",
    "assembly_months": "19",
    "chair": "Perpetua Nakashima-Oyelaran",
    "chair_since": "2238",
    "edition": "14",
    "edition_year": "2241",
    "previous_edition_year": "2236",
    "office_deck": "Deck 9",
    "office_hours": "06:00 to 18:00",
}


@dataclass(frozen=True)
class Station:
    name: str
    location: str
    bays: str
    master: str
    commissioned: str
    specialty: str
    hazard_bay: str
    detail: str


STATIONS = [
    Station("Tycho Ring Station", "in low orbit above the Moon's Tycho crater", "46",
            "Odalys Fenwick-Ure", "2191", "headquarters administration and crew transfers",
            "Bay 31",
            "It is the only Cooperative station that receives passenger shuttles from "
            "Harlan Skyport, and about 2,760 people live aboard."),
    Station("Calloway Spindle", "at the L4 point of the Earth-Moon system", "29",
            "Brannock Ashdel", "2196", "cryogenic volatiles", "Bay 4",
            "The Spindle takes its name from the surveyor Augustin Calloway and turns at "
            "1.8 revolutions per minute to give its crew partial gravity."),
    Station("Vesta Terminal", "in orbit around the asteroid Vesta", "38",
            "Dorian Pelletreau", "2203", "refined nickel-iron ore", "Bay 22",
            "Its smelter, the largest in the Cooperative, processes 610 tonnes of ore a day."),
    Station("Perihelion Depot", "in a shaded orbit around Mercury", "17",
            "Yusra Quillane", "2209", "solar-panel manufacturing", "Bay 12",
            "A sunshade 640 metres wide keeps the whole depot in permanent shadow."),
    Station("Ganymede Narrows Platform", "in orbit around Ganymede", "23",
            "Kwame Istvanoff", "2214", "water ice and medical supplies", "Bay 15",
            "It is the most distant Cooperative station, and its relay mast is painted orange."),
]


@dataclass(frozen=True)
class Ship:
    name: str
    ship_class: str
    role: str
    captain: str
    home: str
    crew: int
    launched: str
    registry: str
    route: str
    detail: str


SHIPS = [
    Ship("Patient Anvil", "Drayhorse-class", "ore hauler", "Signe Okafor-Lindqvist",
         "Vesta Terminal", 17, "2198",
         "OFC-102", "the ore run from Vesta Terminal to Tycho Ring Station",
         "She is the oldest ship still in service and carries a brass bell from Kessler "
         "Anchorage."),
    Ship("Copperline", "Drayhorse-class", "bulk hauler", "Rosalind Achterberg-Vey",
         "Vesta Terminal", 14, "2201",
         "OFC-131", "the bulk run between Vesta Terminal and Calloway Spindle",
         "She is named after the Copperline Bridge in Meridian Falls, the hometown of her "
         "first crew."),
    Ship("Saltmarsh Heron", "Wader-class", "volatiles tanker", "Emeric Dubois-Tanaka",
         "Calloway Spindle", 11, "2205",
         "OFC-146", "the volatiles run from Calloway Spindle to Ganymede Narrows Platform",
         "From 2209 to 2224 she was commanded by Hollis Okonkwo-Brandt, who then left the "
         "Cooperative for civic office on Earth; Dubois-Tanaka took command in 2224."),
    Ship("Amberlight Promise", "Lyre-class", "passenger freighter", "Tobiah Grunewald-Sato",
         "Tycho Ring Station", 22, "2211",
         "OFC-158", "the passenger loop between Tycho Ring Station and Calloway Spindle",
         "She has cabins for 64 passengers and a small galley garden of dwarf lemons."),
    Ship("Wren's Step", "Glacier-class", "refrigerated freighter", "Ayodele Marchbanks",
         "Ganymede Narrows Platform", 9, "2216",
         "OFC-173", "the cold run between Ganymede Narrows Platform and Vesta Terminal",
         "She is named after Wren's Step Bridge in Meridian Falls, and her cold holds are kept "
         "at minus 38 degrees Celsius."),
    Ship("Kestrel Heights", "Swift-class", "courier", "Marisol Dunleavy-Park",
         "Tycho Ring Station", 6, "2219",
         "OFC-189", "the document circuit linking all five stations",
         "She is named after the district of Meridian Falls where her captain was born."),
    Ship("Solace of Thebe", "Petrel-class", "medical courier", "Ferdinand Oyelowo-Baptiste",
         "Perihelion Depot", 8, "2222",
         "OFC-207", "the medical run from Perihelion Depot to Tycho Ring Station",
         "Her hull is painted white with a single violet stripe."),
]


@dataclass(frozen=True)
class ShipClass:
    name: str
    capacity: str
    yard: str
    first_built: str


SHIP_CLASSES = [
    ShipClass("Drayhorse", "9,600 tonnes of cargo", "Brightwater Yards", "2197"),
    ShipClass("Wader", "5,200 cubic metres of liquid cargo", "Ostrander Yard", "2204"),
    ShipClass("Lyre", "1,100 tonnes of cargo and 64 passengers", "Brightwater Yards", "2210"),
    ShipClass("Glacier", "3,700 tonnes of chilled cargo", "Kovac Orbital Works", "2215"),
    ShipClass("Swift", "45 tonnes of cargo", "Kovac Orbital Works", "2218"),
    ShipClass("Petrel", "120 tonnes of cargo", "Selvaggio Shipworks", "2220"),
]


@dataclass(frozen=True)
class Rank:
    name: str
    insignia: str
    hours: str
    pay: str


RANKS = [
    Rank("Cadet", "grey", "no", "900 credits"),
    Rank("Deckhand", "olive", "400", "2,150 credits"),
    Rank("Mate", "teal", "1,500", "3,400 credits"),
    Rank("Pilot", "silver", "2,400", "4,750 credits"),
    Rank("Captain", "crimson", "3,200", "6,300 credits"),
]

LEAVE = {"days": "36 days", "hazard_bonus": "15 percent", "hazard_zone": "beyond the asteroid belt"}

COMMS = {
    "time": "Tycho Standard Time",
    "hailing": "channel 61",
    "distress": "channel 88",
    "mail_day": "Tuesday",
    "ganymede_delay": "about 43 minutes",
}

WELFARE = {
    "medic_rule": "more than 10",
    "cmo": "Anselm Kirabo-Leclerc",
    "cmo_station": "Perihelion Depot",
    "hold_fund": "Hold Fund",
    "hold_fund_share": "70 percent",
    "pension_age": "62",
    "pension_years": "20 years",
}

ACADEMY = {
    "name": "Ashfall Academy",
    "station": "Calloway Spindle",
    "months": "30",
    "director": "Imogen Valdivia-Strand",
    "intake": "48 cadets",
}


@dataclass(frozen=True)
class Cargo:
    code: str
    contents: str
    handling: str
    surcharge: str | None  # None: no surcharge


CARGO = [
    Cargo("VX-CRYO-19", "cryogenic volatiles such as liquid hydrogen and methane",
          "must be loaded through blue-striped couplings and may stay in a hold for at most "
          "96 hours", "12 percent"),
    Cargo("NF-ORE-204", "refined nickel-iron ore",
          "is weighed at loading and again at unloading, and the two weights may differ by no "
          "more than 0.4 percent", None),
    Cargo("MED-PRIO-3", "medical supplies",
          "always travels in the forward hold and is unloaded before anything else",
          "35 percent"),
    Cargo("HAB-SEED-41", "seed vaults and agricultural stock",
          "must be kept between 2 and 6 degrees Celsius for the whole voyage", "8 percent"),
    Cargo("BIO-QUAR-8", "biological samples",
          "must be quarantined for 21 days after arrival", "27 percent"),
    Cargo("MF-LUX-77", "lantern glass bound for the Lanternwake Festival in Meridian Falls",
          "is packed in straw-filled crates of 50 lanterns each", "5 percent"),
]

FUEL = {
    "mass": "Halden-3",
    "round_trip_burn": "4,180 tonnes",
    "swift_reserve": "312 tonnes",
    "margin": "18 percent",
    "price": "642 credits",
    "refuel_station": "Calloway Spindle",
    "audit_days": "45 days",
    "steward": "Halvard Ekwueme-Rossi",
}

APPROACH = {
    "procedure": "D-7",
    "name": "Three-Call Approach",
    "calls": ("50 kilometres", "5 kilometres", "500 metres"),
    "hold": "200 metres",
    "speed": "0.3 metres per second",
}

EMERGENCY_CODES = [
    ("Code Marigold", "a hull breach"),
    ("Code Juniper", "a medical emergency"),
    ("Code Tallow", "a fire in a cargo hold"),
    ("Code Slate", "a loss of communications"),
]

SAFETY = {
    "muster": "the nearest amber hatch",
    "inspection": "every 40th container",
    "rest": "11 hours",
    "cycle": "26-hour duty cycle",
}

AWARD = {
    "name": "Quay Star",
    "hours": "5,000 accident-free flight hours",
    "first_year": "2199",
    "first_recipient": "Signe Okafor-Lindqvist",
}

GLOSSARY = [
    ("ballast run", "a flight with empty holds"),
    ("green board", "the station master's clearance to undock"),
    ("cold stack", "a pile of refrigerated containers waiting for transfer"),
    ("tug tithe", "the fee of 40 credits a station charges for each tug assist"),
    ("long haul", "any voyage longer than 60 days"),
]

STORM = {"year": "2227", "ships": "13 ships", "days": "9 days", "station": "Perihelion Depot"}

TIMELINE = [
    ("2198", "the *Patient Anvil* flew the Cooperative's first Vesta run"),
    ("2195", f"the {WELFARE['hold_fund']} paid out its first claim"),
    ("2213", "the fleet adopted its saffron-and-slate livery"),
    ("2219", f"the {ACADEMY['name']} graduated its 1,000th cadet"),
    (STORM["year"], f"the Great Solar Storm struck, and {STORM['station']} sheltered "
                    f"{STORM['ships']} for {STORM['days']}"),
    ("2234", "annual freight volume first exceeded 1.2 million tonnes"),
    (COOP["chair_since"], f"{COOP['chair']} was elected chair of the {COOP['assembly']}"),
    (COOP["edition_year"], f"Edition {COOP['edition']} of this handbook was approved"),
]


# --------------------------------------------------------------------------
# Meridian Falls: fact tables
# --------------------------------------------------------------------------

CITY = {
    "name": "Meridian Falls",
    "founded": "2 June 2142",
    "founder": "Augustin Calloway",
    "river": "Oriel River",
    "drop": "54 metres",
    "incorporated": "2188",
    "elevation": "262 metres",
    "rainfall": "1,142 millimetres",
    "motto": "Over the Water, Under the Stars",
    "flower": "blue yarrow",
    "bird": "ember finch",
    "clerk": "Ottoline Brisbane-Fayed",
    "print_run": "3,000 copies",
    "gorge_length": "2.3 kilometres",
    "neighbour": "Ashby Cross",
    "neighbour_distance": "18 kilometres",
    "census_year": "2240",
    "edition_year": "2241",
}


@dataclass(frozen=True)
class District:
    name: str
    population: int
    description: str
    known_for: str
    councillor: str
    high_street: str


DISTRICTS = [
    District("Old Quay", 7_214,
             "the oldest district, built around the river landing where the founder first camped",
             "its Thursday fish market and the narrowest street in the city, Pinch Lane",
             "Agnes Thornbury-Vale", "Ferry Street"),
    District("Millrace", 13_046, "the former mill district beside the Tannery Canal",
             "the brick chimneys of its old flour mills",
             "Osric Balogun-Frey", "Sluice Road"),
    District("Thistledown", 11_508, "a quiet residential district of terraced houses",
             "a community orchard of 300 pear trees",
             "Leontine Mbeki-Harrow", "Pear Tree Walk"),
    District("Kestrel Heights", 9_873, "a hillside district above the falls",
             "the Kestrel Heights Observatory, whose telescope mirror is 1.6 metres across",
             "Casimir Ruiz-Penhallow", "Skyline Terrace"),
    District("Lantern Row", 6_390, "the arts district along the east bank of the river",
             "glassblowing workshops that shape the festival lanterns",
             "Dagny Featherstone-Ito", "Cullet Lane"),
    District("Harlan Flats", 14_102, "the newest district, on the plain south of the city",
             "Harlan Skyport",
             "Ravi Lachance-Ogden", "Runway Avenue"),
]


@dataclass(frozen=True)
class Bridge:
    name: str
    spans: str
    opened: str
    length: str
    build: str
    designer: str
    note: str
    article: str = "the "  # how the name is introduced in running text

    @property
    def ref(self) -> str:
        return f"{self.article}{self.name}"


BRIDGES = [
    Bridge("Pell's Folly", "the Millrace Channel", "2150", "31 metres", "a timber trestle",
           "the miller Ezra Pell", "It is now closed to carts.", article=""),
    Bridge("Copperline Bridge", "the Oriel River", "2158", "212 metres",
           "a copper-clad steel truss", "the engineer Mathilde Okoro-Lange",
           "It links Old Quay with Millrace, and its cladding is polished every spring by "
           "volunteers."),
    Bridge("Wren's Step Bridge", "the Selby Brook", "2171", "48 metres", "a single stone arch",
           "the mason Tobias Wren", "Couples traditionally tie ribbons to its railings.",
           article=""),
    Bridge("Glasswater Footbridge", "the Tannery Canal", "2189", "76 metres",
           "a steel frame with a glass deck", "the architect Soraya Bellweather-Inoue",
           "It is open to pedestrians only."),
    Bridge("Saint Odile Viaduct", "the Harlan Cutting", "2211", "390 metres",
           "a concrete viaduct of 17 arches", "the engineer Joaquim Adeyemi-Roth",
           "It carries the Indigo Line trams."),
]


@dataclass(frozen=True)
class Mayor:
    name: str
    start: str
    end: str | None  # None: in office
    deed: str  # one full sentence
    epithet: str = ""


MAYORS = [
    Mayor("Cordelia Ashby-Ravel", "2190", "2198",
          "She was the first mayor elected after incorporation, and she built City Hall."),
    Mayor("Benedek Salonen-Hart", "2198", "2207",
          "He created the Greywell Reservoir and planted the lime avenue on Calloway Square."),
    Mayor("Priya Lindgren-Osei", "2207", "2219",
          "She opened both the Saint Odile Viaduct and the Indigo Line in 2211."),
    Mayor("Marcus Oduya-Fairweather", "2219", "2231",
          "He founded the Lanternwake Festival in 2222 and twinned the city with Port Azalea."),
    Mayor("Hollis Okonkwo-Brandt", "2231", "2239",
          "She opened the Amber Line in 2235 and rebuilt the flood wall along Old Quay.",
          epithet="a former freight captain"),
    Mayor("Tamsin Abernathy-Kohl", "2239", None,
          "She launched the Riverbank Plan to replant the banks of the river with willows."),
]


@dataclass(frozen=True)
class Festival:
    name: str
    date: str
    first: str
    district: str
    feature: str
    visitors: str
    article: str = "the "

    @property
    def ref(self) -> str:
        return f"{self.article}{self.name}"


FESTIVALS = [
    Festival("Thaw Fair", "21 March", "2160", "Kestrel Heights",
             "sledge races on the last snow of Kestrel Hill and the crowning of a Thaw Queen",
             "8,500"),
    Festival("Founders' Day", "2 June", "2143", "Old Quay",
             "a parade from the river landing to Calloway Square", "21,000", article=""),
    Festival("Night Market of Saint Odile", "17 August", "2212", "Harlan Flats",
             "food stalls set up beneath the arches of the Saint Odile Viaduct", "12,400"),
    Festival("Lanternwake Festival", "9 October", "2222", "Lantern Row",
             "4,000 glass lanterns set afloat on the Oriel River at dusk", "30,500"),
    Festival("Brookside Regatta", "6 July", "2185", "Thistledown",
             "rowing races over a 600-metre course on the Selby Brook", "5,800"),
]


@dataclass(frozen=True)
class Library:
    name: str
    district: str
    weekdays: str
    saturday: str
    sunday: str | None  # None: closed on Sundays
    volumes: str
    librarian: str
    note: str


LIBRARIES = [
    Library("Central Library", "Old Quay", "08:00 to 20:00", "09:00 to 17:00", None,
            "412,000", "Beatrix Nwosu-Calder",
            "Its reading room has a painted ceiling showing the falls."),
    Library("Varga-Onu Branch", "Thistledown", "10:00 to 18:30", "10:00 to 14:00", None,
            "58,300", "Lorcan Esposito-Haig",
            "It is named for the Thistledown-born navigator Ilsabet Varga-Onu."),
    Library("Millrace Branch", "Millrace", "12:00 to 21:00", "10:00 to 16:00", "11:00 to 15:00",
            "71,900", "Hana Valcourt-Reyes", "It is housed in a converted flour mill."),
    Library("Kestrel Heights Branch", "Kestrel Heights", "09:30 to 17:30", "09:30 to 13:00", None,
            "44,650", "Piet Achebe-Marlow", "It has a rooftop reading terrace."),
]


@dataclass(frozen=True)
class TramLine:
    colour: str
    ends: tuple[str, str] | None  # None: circular route
    opened: str
    stops: str
    every: str
    last: str
    note: str = ""


TRAMS = [
    TramLine("Vermilion", ("Millrace", "Lantern Row"), "2194", "11", "8 minutes", "23:10",
             "It is the oldest line and still uses wooden-seated cars."),
    TramLine("Indigo", ("Old Quay", "Harlan Skyport"), "2211", "14", "6 minutes", "00:30",
             "It crosses the Saint Odile Viaduct."),
    TramLine("Teal", None, "2226", "17", "12 minutes", "22:45",
             "Its route passes all four library buildings."),
    TramLine("Amber", ("Thistledown", "Kestrel Heights"), "2235", "9", "10 minutes", "23:55",
             "It climbs the steepest tram gradient in the city."),
]

TRAM_FARE = {"fare": "1.75 credits", "valid": "90 minutes", "depot": "Sorrel Yard"}


@dataclass(frozen=True)
class School:
    name: str
    district: str
    founded: str
    pupils: str
    head: str
    colours: str


SCHOOLS = [
    School("Calloway Grammar School", "Old Quay", "2151", "640 pupils", "Winifred Asante-Moll",
           "maroon and gold"),
    School("Millrace Technical College", "Millrace", "2196", "1,180 students",
           "Rafael Kinnunen-Obi", "black and copper"),
    School("Thistledown Primary School", "Thistledown", "2204", "310 pupils",
           "Ines Barrow-Tamura", "pale green and white"),
    School("Harlan Flats Academy", "Harlan Flats", "2230", "870 pupils", "Gideon Ferreira-Lusk",
           "navy and orange"),
]


@dataclass(frozen=True)
class Park:
    name: str
    hectares: str
    district: str
    feature: str


PARKS = [
    Park("Confluence Park", "24 hectares", "Old Quay",
         "the Confluence Stones, where the Selby Brook joins the river"),
    Park("Greywell Commons", "61 hectares", "Harlan Flats", "the shore of the Greywell Reservoir"),
    Park("Orchard Green", "9 hectares", "Thistledown", "a bandstand built in 2201"),
    Park("Finch Meadow", "15 hectares", "Kestrel Heights",
         "a wildflower reserve where the ember finch nests"),
]

@dataclass(frozen=True)
class Landmark:
    name: str
    district: str
    year: str
    fact: str


LANDMARKS = [
    Landmark("Old Ferry House", "Old Quay", "2146",
             "is the oldest surviving building in the city and now sells ferry-era maps"),
    Landmark("Meridian Falls Museum", "Old Quay", "2177",
             "displays the brass surveying chain of Augustin Calloway and charges an admission "
             "of 4 credits"),
    Landmark("Falls Lookout", "Kestrel Heights", "2184",
             "is reached by a stairway of 187 steps cut into the gorge wall"),
    Landmark("Rosewater Theatre", "Lantern Row", "2199",
             "seats 780 people and stages a new play every October"),
    Landmark("Sundial Steps", "Millrace", "2215",
             "form a public sundial whose bronze pointer is 6 metres tall"),
]

COUNCIL = {
    "chamber": "Oriel Chamber",
    "meets": "the first Monday of each month",
    "term": "four years",
    "next_election": "2243",
}

SPORT = {
    "club": "Meridian Falls Kingfishers",
    "ground": "Tannery Ground",
    "capacity": "9,200",
    "race": "Gorge Run",
    "race_length": "14 kilometres",
    "race_month": "May",
}

RAIL = {
    "station": "Meridian Falls Central Station",
    "trains": "Two intercity trains an hour",
    "journey": "74 minutes",
}

MEDIA = {
    "paper": "Meridian Courier",
    "paper_founded": "2163",
    "paper_day": "Wednesday",
    "editor": "Clementine Harcourt-Yusuf",
    "radio": "Radio Oriel",
    "frequency": "97.4",
}

CITY_TIMELINE = [
    ("2167", "the Great Flood left Old Quay under 2 metres of water"),
    ("2176", "the first glassworks opened in Lantern Row"),
    ("2203", "the record snowfall closed every road for eleven days"),
    ("2217", "a fire destroyed the old covered market on Ferry Street"),
    ("2236", "the population of the city first passed 60,000"),
]

CLIMATE = {
    "warmest": "July",
    "warm_avg": "23 degrees Celsius",
    "coldest": "January",
    "cold_avg": "minus 4 degrees Celsius",
    "freeze": "once every seven winters",
    "record_snow": "2203",
}

ECONOMY = {
    "employer": "Millrace Glassworks",
    "workers": "1,450 workers",
    "hospital": "Selby Brook Hospital",
    "beds": "220 beds",
    "market_day": "Saturday",
}

CIVIC = {
    "city_hall_year": "2192",
    "square": "Calloway Square",
    "tower": "41 metres",
    "bell": "Old Meridian",
    "skyport_opened": "2208",
    "launch_pads": "six launch pads",
    "reservoir": "Greywell Reservoir",
    "reservoir_volume": "8.4 billion litres",
    "fire_stations": "five fire stations",
    "twin": "Port Azalea",
    "twinned": "2229",
    "hydro": "Oriel Hydro Station",
    "hydro_output": "38 megawatts",
    "recycling_day": "Friday",
}


# --------------------------------------------------------------------------
# Documents and questions
# --------------------------------------------------------------------------

@dataclass
class Section:
    key: str
    heading: str
    paragraphs: list[str]

    def render(self) -> str:
        return f"## {self.heading}\n\n" + "\n\n".join(self.paragraphs) + "\n"


@dataclass
class Document:
    title: str
    sections: list[Section]

    def render(self) -> str:
        return f"# {self.title}\n\n" + "\n".join(s.render() for s in self.sections)

    def section(self, key: str) -> Section:
        return next(s for s in self.sections if s.key == key)


@dataclass
class Question:
    section: str  # key of the section that answers it ("" for cross questions)
    question: str
    answers: list[str]
    choices: list[str] | None = None
    correct_text: str = ""  # multiple choice: text of the right option
    # cross questions: phrases each corpus must hold and the other must not
    evidence: dict[str, list[str]] = field(default_factory=dict)

    def record(self, qid: str) -> dict:
        rec: dict = {"schema": SCHEMA, "id": qid, "question": self.question}
        if self.choices is not None:
            rec["choices"] = self.choices
        rec["answers"] = self.answers
        rec["metric"] = "multiple_choice" if self.choices is not None else "contains"
        return rec


class QuestionSet:
    """Collects questions; multiple-choice options are shuffled with ``rng``."""

    def __init__(self, prefix: str, rng: random.Random):
        self.prefix = prefix
        self.rng = rng
        self.items: list[Question] = []

    def ask(self, section: str, question: str, *answers: str, **evidence: list[str]) -> None:
        self.items.append(Question(section, question, list(answers), evidence=evidence))

    def choose(self, section: str, question: str, correct: str, distractors: list[str],
               **evidence: list[str]) -> None:
        options = [correct, *distractors]
        assert len(options) == len(LETTERS) and len(set(options)) == len(options), options
        self.rng.shuffle(options)
        letter = LETTERS[options.index(correct)]
        self.items.append(Question(section, question, [letter], options, correct, evidence))

    def records(self) -> list[dict]:
        return [q.record(f"{self.prefix}-{i:03d}") for i, q in enumerate(self.items, 1)]


def pick(rng: random.Random, templates: list[str], **values: object) -> str:
    """Render one of several equivalent sentence templates (all use every value)."""
    return rng.choice(templates).format(**values)


def join_names(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def by_name(table: list, name: str, attr: str = "name"):
    return next(x for x in table if getattr(x, attr) == name)


# --------------------------------------------------------------------------
# Orbital corpus
# --------------------------------------------------------------------------

STATION_TEMPLATES = [
    "**{name}** lies {location}. Commissioned in {commissioned}, it has {bays} docking bays and "
    "specialises in {specialty}. Its station master is {master}. {detail} Hazardous cargo may "
    "dock only at {hazard_bay}.",
    "Station master {master} runs **{name}**, which lies {location} and was commissioned in "
    "{commissioned}. The station offers {bays} docking bays, of which {hazard_bay} is reserved "
    "for hazardous cargo, and handles mostly {specialty}. {detail}",
    "**{name}** was commissioned in {commissioned} and lies {location}. With {bays} docking bays "
    "under station master {master}, it concentrates on {specialty}; hazardous cargo is handled "
    "at {hazard_bay} only. {detail}",
]

SHIP_TEMPLATES = [
    "The *{name}* (registry {registry}) is a {ship_class} {role} launched in {launched}. Her "
    "captain is {captain}, she carries a crew of {crew}, and her home station is {home}. She "
    "usually flies {route}. {detail}",
    "Captain {captain} commands the *{name}*, a {ship_class} {role} with a crew of {crew} and "
    "the registry number {registry}. She was launched in {launched}, is based at {home} and "
    "usually flies {route}. {detail}",
    "Launched in {launched}, the *{name}* is a {ship_class} {role} home-ported at {home}, "
    "registered as {registry}. She sails with a crew of {crew} under Captain {captain}, usually "
    "flying {route}. {detail}",
]

CARGO_TEMPLATES = [
    "Cargo code **{code}** covers {contents}. Such cargo {handling}, and {surcharge}.",
    "Under code **{code}** the Cooperative ships {contents}; this cargo {handling}, and "
    "{surcharge}.",
]


def orbital_document(rng: random.Random) -> Document:
    c = COOP
    f1, f2 = c["founders"]
    founding = Section("founding", "Founding and Charter", [
        f"The {c['name']} ({c['short']}) was founded on {c['founded']} aboard {c['founded_at']}, "
        f"a cramped habitat that has since been decommissioned. Its founders, the navigator {f1} "
        f"and the cargo broker {f2}, pooled {c['founding_tugs']} second-hand tugs and registered "
        f"the venture with the {c['registry']} as {c['charter']}. Headquarters moved from "
        f"{c['founded_at']} to {c['hq']} in {c['hq_moved']} and have remained there since.",
        f"The Cooperative is owned by its member crews, of which there are currently {c['crews']}. "
        f"Each crew pays dues of {c['dues']} of its gross freight revenue. Policy is set by the "
        f"{c['assembly']}, which convenes every {c['assembly_months']} months and has been chaired "
        f"by {c['chair']} since {c['chair_since']}. The Cooperative motto, painted above every "
        f"cargo hatch in the fleet, is \"{c['motto']}\".",
    ])

    stations = Section("stations", "Stations", [
        f"The Cooperative operates {WORDS[len(STATIONS)]} stations: "
        f"{join_names([s.name for s in STATIONS])}. Every station keeps a station master on duty "
        f"around the clock, and docking bays are numbered from 1 upward at each station.",
        *(pick(rng, STATION_TEMPLATES, **vars(s)) for s in STATIONS),
    ])

    total_crew = sum(s.crew for s in SHIPS)
    fleet = Section("fleet", "Fleet Register", [
        f"The fleet register lists {WORDS[len(SHIPS)]} ships with a combined crew of {total_crew}. "
        f"Ships are listed below in order of launch, oldest first.",
        *(pick(rng, SHIP_TEMPLATES, **vars(s)) for s in SHIPS),
    ])

    classes = Section("classes", "Ship Classes", [
        "Every ship class is built by a single shipyard, and the class name is painted beside "
        "the registry number on every hull. "
        + " ".join(f"A {k.name}-class ship carries up to {k.capacity}; the class was first built "
                   f"in {k.first_built} at {k.yard}." for k in SHIP_CLASSES),
    ])

    a, lv = ACADEMY, LEAVE
    rank_sentences = " ".join(
        f"A {r.name} wears {r.insignia} insignia, needs {r.hours} logged flight hours and earns "
        f"a base pay of {r.pay} a month." for r in RANKS
    )
    ranks = Section("ranks", "Ranks, Pay and Training", [
        f"Crew ranks, from lowest to highest, are {join_names([r.name for r in RANKS])}. "
        + rank_sentences,
        f"Every crew member is entitled to {lv['days']} of shore leave a year, and runs "
        f"{lv['hazard_zone']} earn a hazard bonus of {lv['hazard_bonus']} on top of base pay.",
        f"All cadets train at the {a['name']} aboard {a['station']}. The course lasts "
        f"{a['months']} months, each yearly intake is limited to {a['intake']}, and the academy "
        f"director is {a['director']}.",
    ])

    w = WELFARE
    welfare = Section("welfare", "Health and Welfare", [
        f"Every ship with {w['medic_rule']} crew must carry a qualified medic, and every crew "
        f"member has a full medical examination once a year. The Cooperative's chief medical "
        f"officer, {w['cmo']}, works from {w['cmo_station']}. Losses are covered by the "
        f"{w['hold_fund']}, a mutual fund into which every crew pays; it refunds "
        f"{w['hold_fund_share']} of the value of lost or damaged cargo. Crew members may draw a "
        f"Cooperative pension from age {w['pension_age']} once they have {w['pension_years']} of "
        f"service.",
    ])

    cm = COMMS
    comms = Section("comms", "Communications", [
        f"All logs, schedules and contracts use {cm['time']}. Ships hail stations on "
        f"{cm['hailing']}, and {cm['distress']} is kept clear for distress calls at all times. "
        f"A ship's call sign is its registry number. The weekly mail packet leaves "
        f"{c['hq']} every {cm['mail_day']}, and a message from {c['hq']} to Ganymede Narrows "
        f"Platform takes {cm['ganymede_delay']} to arrive.",
    ])

    cargo_paragraphs = []
    for cg in CARGO:
        surcharge = (f"it carries a surcharge of {cg.surcharge} on the base freight rate"
                     if cg.surcharge else "it carries no surcharge")
        cargo_paragraphs.append(pick(rng, CARGO_TEMPLATES, code=cg.code, contents=cg.contents,
                                     handling=cg.handling, surcharge=surcharge))
    cargo = Section("cargo", "Cargo Codes", [
        "Every container carries a cargo code stencilled on all six faces. A container without a "
        "readable code may not be loaded.",
        *cargo_paragraphs,
    ])

    fu = FUEL
    fuel = Section("fuel", "Fuel and Reaction Mass", [
        f"All Cooperative ships burn {fu['mass']} reaction mass. A Drayhorse-class hauler burns "
        f"{fu['round_trip_burn']} of it on a round trip between Vesta Terminal and Tycho Ring "
        f"Station, and a Swift-class courier must carry a reserve of {fu['swift_reserve']} at all "
        f"times. Every flight plan must include a fuel reserve of {fu['margin']} above the planned "
        f"burn.",
        f"Reaction mass costs {fu['price']} per tonne at {fu['refuel_station']}, the Cooperative's "
        f"main refuelling point. Fuel logs are audited every {fu['audit_days']} by the Fuel "
        f"Steward, currently {fu['steward']}.",
    ])

    ap, sf = APPROACH, SAFETY
    codes = "; ".join(f"{name} means {meaning}" for name, meaning in EMERGENCY_CODES)
    procedures = Section("procedures", "Docking and Safety Procedures", [
        f"A ship approaching any Cooperative station follows Procedure {ap['procedure']}, the "
        f"{ap['name']}: the pilot calls the station at {join_names(list(ap['calls']))}, then "
        f"holds at {ap['hold']} until cleared. Final approach speed must not exceed "
        f"{ap['speed']}.",
        f"Emergency codes are broadcast on every deck: {codes}. On hearing any code, crew muster "
        f"at {sf['muster']}. Customs inspectors open {sf['inspection']} at random, and under the "
        f"Long Rest Rule every crew member must have at least {sf['rest']} of rest in every "
        f"{sf['cycle']}.",
    ])

    aw = AWARD
    history = Section("history", "Awards and History", [
        f"The Cooperative's highest honour, the {aw['name']}, is named after co-founder {f2} and "
        f"goes to captains who log {aw['hours']}. It was first awarded in {aw['first_year']}, to "
        f"{aw['first_recipient']}.",
        "Milestones since the founding: "
        + "; ".join(f"in {year}, {event}" for year, event in sorted(TIMELINE)) + ".",
        f"Questions about this handbook go to the Handbook Office on {c['office_deck']} of "
        f"{c['hq']}, open from {c['office_hours']} station time. Edition {c['edition']} replaces "
        f"the edition of {c['previous_edition_year']}.",
    ])

    glossary = Section("glossary", "Glossary", [
        "Crews use a few terms that newcomers find puzzling. "
        + " ".join(f"A \"{term}\" is {meaning}." for term, meaning in GLOSSARY),
    ])

    return Document(f"{c['name']} Crew Handbook, Edition {c['edition']}",
                    [founding, stations, fleet, classes, ranks, cargo, fuel, welfare, comms,
                     procedures, history, glossary])


def orbital_questions(rng: random.Random) -> QuestionSet:
    qs = QuestionSet("orbital", rng)
    c = COOP
    f1, f2 = c["founders"]
    st = lambda n: by_name(STATIONS, n)  # noqa: E731
    sh = lambda n: by_name(SHIPS, n)  # noqa: E731
    klass = lambda n: by_name(SHIP_CLASSES, n)  # noqa: E731
    rank = lambda n: by_name(RANKS, n)  # noqa: E731
    surname = lambda name: name.split()[-1]  # noqa: E731

    qs.ask("founding", f"On what date was the {c['name']} founded?", c["founded"])
    qs.ask("founding", "Under which charter is the Orbital Freight Cooperative registered?",
           c["charter"], c["charter"].split()[-1])
    qs.ask("founding", "What is the Orbital Freight Cooperative's motto?", c["motto"])
    qs.ask("founding", "How many member crews does the Orbital Freight Cooperative currently have?",
           c["crews"])
    qs.choose("founding", "Which of these people co-founded the Orbital Freight Cooperative?",
              f2, ["Brannock Ashdel", "Emeric Dubois-Tanaka", "Halvard Ekwueme-Rossi"])

    qs.ask("stations", "Who is the station master of Vesta Terminal?",
           st("Vesta Terminal").master, surname(st("Vesta Terminal").master))
    qs.ask("stations", "How many docking bays does Tycho Ring Station have?",
           st("Tycho Ring Station").bays)
    qs.ask("stations", "At Vesta Terminal, which docking bay is reserved for hazardous cargo?",
           st("Vesta Terminal").hazard_bay)
    qs.ask("stations", "Which Cooperative station is shaded by a sunshade 640 metres wide?",
           "Perihelion Depot")
    qs.ask("stations", "How fast does Calloway Spindle turn?", "1.8 revolutions per minute")

    qs.ask("fleet", "What is the combined crew of the Cooperative fleet?",
           str(sum(s.crew for s in SHIPS)))
    qs.ask("fleet", "Who captains the Patient Anvil?", sh("Patient Anvil").captain,
           surname(sh("Patient Anvil").captain))
    qs.ask("fleet", "What is the registry number of the Wren's Step?", sh("Wren's Step").registry)
    qs.ask("fleet", "In what year was the Solace of Thebe launched?",
           sh("Solace of Thebe").launched)
    qs.ask("fleet", "Who is the current captain of the Saltmarsh Heron?",
           sh("Saltmarsh Heron").captain, surname(sh("Saltmarsh Heron").captain))
    qs.choose("fleet", "Which ship is home-ported at Perihelion Depot?", "Solace of Thebe",
              ["Wren's Step", "Amberlight Promise", "Patient Anvil"])

    qs.ask("classes", "How much cargo can a Drayhorse-class ship carry?",
           klass("Drayhorse").capacity.split(" of ")[0])
    qs.ask("classes", "Which shipyard builds Swift-class ships?", klass("Swift").yard)

    qs.ask("ranks", "What colour is the insignia of a Mate?", rank("Mate").insignia)
    qs.ask("ranks", "What is the monthly base pay of a Pilot?", rank("Pilot").pay)
    qs.ask("ranks", "Who is the director of the Ashfall Academy?", ACADEMY["director"],
           surname(ACADEMY["director"]))

    qs.ask("cargo", "Which cargo code covers biological samples?", "BIO-QUAR-8")
    qs.ask("cargo", "What is the longest that VX-CRYO-19 cargo may stay in a hold?", "96 hours")
    qs.ask("cargo", "What surcharge applies to cargo code MED-PRIO-3?",
           by_name(CARGO, "MED-PRIO-3", "code").surcharge)
    qs.choose("cargo", "Which cargo code covers seed vaults and agricultural stock?", "HAB-SEED-41",
              ["NF-ORE-204", "VX-CRYO-19", "MED-PRIO-3"])

    qs.ask("fuel", "What reaction mass do Cooperative ships burn?", FUEL["mass"])
    qs.ask("fuel", "How much reaction mass does a Drayhorse-class hauler burn on a round trip "
                   "between Vesta Terminal and Tycho Ring Station?", FUEL["round_trip_burn"])
    qs.ask("fuel", "What fuel reserve above the planned burn must every flight plan include?",
           FUEL["margin"])

    qs.ask("welfare", "Who is the Cooperative's chief medical officer?", WELFARE["cmo"],
           surname(WELFARE["cmo"]))
    qs.ask("welfare", "What share of the value of lost cargo does the Hold Fund refund?",
           WELFARE["hold_fund_share"])

    qs.ask("comms", "On which channel do Cooperative ships hail stations?", COMMS["hailing"])
    qs.ask("comms", "On which day of the week does the mail packet leave Tycho Ring Station?",
           COMMS["mail_day"])

    qs.ask("procedures", "What is the procedure number of the Three-Call Approach?",
           APPROACH["procedure"])
    qs.ask("procedures", "What is the maximum final approach speed when docking?",
           APPROACH["speed"])
    qs.choose("procedures", "What does Code Marigold mean?", "a hull breach",
              [m for n, m in EMERGENCY_CODES if n != "Code Marigold"])

    qs.ask("history", f"How many accident-free flight hours must a captain log to receive the "
                      f"{AWARD['name']}?", AWARD["hours"].split(" accident")[0])
    qs.ask("history", "How many ships did Perihelion Depot shelter during the Great Solar Storm?",
           STORM["ships"])
    qs.ask("history", "Which livery did the fleet adopt in 2213?", "saffron-and-slate")
    qs.ask("glossary", "How much is the tug tithe?", "40 credits")
    return qs


# --------------------------------------------------------------------------
# Meridian corpus
# --------------------------------------------------------------------------

DISTRICT_TEMPLATES = [
    "**{name}** ({population} residents) is {description}. It is best known for {known_for}. "
    "Its high street is {high_street}, and its district councillor is {councillor}.",
    "With {population} residents, **{name}** is {description}, best known for {known_for}. "
    "Its high street is {high_street}, and {councillor} represents it on the city council.",
]

BRIDGE_TEMPLATES = [
    "{Ref} spans {spans}. Opened in {opened}, it is {length} long and was built as {build} "
    "designed by {designer}. {note}",
    "Built as {build} to a design by {designer}, {ref} spans {spans} and has been open since "
    "{opened}; it is {length} long. {note}",
]

FESTIVAL_TEMPLATES = [
    "{Ref} is held every year on {date}. First celebrated in {first}, it is centred on "
    "{district}, draws about {visitors} visitors and is known for {feature}.",
    "Every {date} the city celebrates {ref}, first held in {first}. Centred on {district}, it "
    "draws about {visitors} visitors and is known for {feature}.",
]


def population(n: int) -> str:
    return f"{n:,}"


def bold_ref(item: Bridge | Festival) -> dict[str, str]:
    """Template values for an item whose name may need an article: {ref} and {Ref}."""
    ref = f"{item.article}**{item.name}**"
    return {"ref": ref, "Ref": ref[0].upper() + ref[1:]}


def meridian_document(rng: random.Random) -> Document:
    cy, cl, ec = CITY, CLIMATE, ECONOMY
    intro = Section("founding", "Founding and Geography", [
        f"This almanac is compiled every year by the Office of the City Clerk of {cy['name']}; the "
        f"current City Clerk is {cy['clerk']}. This is the {cy['edition_year']} edition; its "
        f"print run is {cy['print_run']}, and a copy is free at every library building.",
        f"{cy['name']} was founded on {cy['founded']} by the surveyor {cy['founder']}, who camped "
        f"beside the waterfall where the {cy['river']} drops {cy['drop']} into a basalt gorge. "
        f"The settlement was incorporated as a city in {cy['incorporated']}. The city centre "
        f"stands {cy['elevation']} above sea level and receives on average {cy['rainfall']} of "
        f"rain a year. The Selby Brook joins the river at the Confluence Stones, just below the "
        f"falls, and the Tannery Canal links the river to the old mill district. The gorge below "
        f"the falls is {cy['gorge_length']} long. The nearest town is {cy['neighbour']}, "
        f"{cy['neighbour_distance']} to the north.",
        f"The warmest month is {cl['warmest']}, averaging {cl['warm_avg']}, and the coldest is "
        f"{cl['coldest']}, averaging {cl['cold_avg']}. The river above the falls freezes over "
        f"about {cl['freeze']}; the record snowfall came in {cl['record_snow']}. The city motto "
        f"is \"{cy['motto']}\". The city flower is the {cy['flower']}, and the city bird is the "
        f"{cy['bird']}.",
    ])

    total = sum(d.population for d in DISTRICTS)
    largest = max(DISTRICTS, key=lambda d: d.population)
    smallest = min(DISTRICTS, key=lambda d: d.population)
    districts = Section("districts", "Districts and Population", [
        f"The {cy['census_year']} census counted {population(total)} residents in "
        f"{WORDS[len(DISTRICTS)]} districts. The most populous district is {largest.name} and the "
        f"least populous is {smallest.name}. Each district elects one councillor.",
        *(pick(rng, DISTRICT_TEMPLATES, **{**vars(d), "population": population(d.population)})
          for d in DISTRICTS),
    ])

    oldest = min(BRIDGES, key=lambda b: int(b.opened))
    longest = max(BRIDGES, key=lambda b: int(b.length.split()[0]))
    bridges = Section("bridges", "Bridges", [
        f"{cy['name']} has {WORDS[len(BRIDGES)]} bridges. The oldest is {oldest.ref} and the "
        f"longest is {longest.ref}.",
        *(pick(rng, BRIDGE_TEMPLATES, **vars(b), **bold_ref(b)) for b in BRIDGES),
    ])

    mayor_sentences = []
    for m in MAYORS:
        who = f"{m.name}, {m.epithet}," if m.epithet else m.name
        if m.end is None:
            mayor_sentences.append(f"The current mayor is {m.name}, who took office in {m.start}. "
                                   f"{m.deed}")
        else:
            mayor_sentences.append(f"{who} served from {m.start} to {m.end}. {m.deed}")
    half = len(MAYORS) // 2
    mayors = Section("mayors", "Mayors", [
        f"Since incorporation the city has had {WORDS[len(MAYORS)]} elected mayors. "
        + " ".join(mayor_sentences[:half]),
        " ".join(mayor_sentences[half:]),
    ])

    festivals = Section("festivals", "Festivals", [
        *(pick(rng, FESTIVAL_TEMPLATES, **vars(f), **bold_ref(f)) for f in FESTIVALS),
    ])

    sunday_open = [lib.name for lib in LIBRARIES if lib.sunday]
    library_paragraphs = []
    for lib in LIBRARIES:
        sunday = (f"on Sundays it opens from {lib.sunday}" if lib.sunday
                  else "it is closed on Sundays")
        library_paragraphs.append(
            f"The **{lib.name}** in {lib.district} is open from {lib.weekdays} on weekdays and "
            f"from {lib.saturday} on Saturdays; {sunday}. It holds {lib.volumes} volumes, and its "
            f"head librarian is {lib.librarian}. {lib.note}")
    libraries = Section("libraries", "Libraries", [
        f"The public library has {WORDS[len(LIBRARIES)]} buildings, and only the "
        f"{join_names(sunday_open)} opens on Sundays. All branches close on public holidays.",
        *library_paragraphs,
    ])

    schools = Section("schools", "Schools", [
        " ".join(f"{sc.name} in {sc.district} was founded in {sc.founded}, has {sc.pupils} and "
                 f"is led by {sc.head}; its colours are {sc.colours}." for sc in SCHOOLS),
    ])

    tf = TRAM_FARE
    tram_paragraphs = []
    for t in TRAMS:
        route = (f"runs between {t.ends[0]} and {t.ends[1]}" if t.ends
                 else "follows a circular route around the city centre")
        tram_paragraphs.append(
            f"The **{t.colour} Line** {route}. It opened in {t.opened}, serves {t.stops} stops and "
            f"runs every {t.every}; the last tram of the day leaves at {t.last}. {t.note}")
    trams = Section("trams", "Tram Lines", [
        f"Tram lines are named by colour. A single fare costs {tf['fare']} and is valid for "
        f"{tf['valid']} on any line; all trams are stabled overnight at {tf['depot']}.",
        *tram_paragraphs,
    ])

    landmarks = Section("landmarks", "Landmarks", [
        " ".join(f"The {lm.name} in {lm.district}, dating from {lm.year}, {lm.fact}."
                 for lm in LANDMARKS),
    ])

    co, sp, rl = COUNCIL, SPORT, RAIL
    council = Section("council", "Council, Sport and Travel", [
        f"The city council, made up of the mayor and the {WORDS[len(DISTRICTS)]} district "
        f"councillors, meets in the {co['chamber']} of City Hall on {co['meets']}. Councillors "
        f"are elected for {co['term']}, and the next election is due in {co['next_election']}.",
        f"The city's football club, the {sp['club']}, plays at the {sp['ground']}, which holds "
        f"{sp['capacity']} spectators. Every {sp['race_month']} runners race the {sp['race']}, "
        f"a course of {sp['race_length']} along the rim of the gorge.",
        f"{rl['trains']} leave {rl['station']} for {CIVIC['twin']}; the journey takes "
        f"{rl['journey']}.",
    ])

    md = MEDIA
    history = Section("history", "History and Media", [
        "Notable events in the city's history: "
        + "; ".join(f"in {year}, {event}" for year, event in sorted(CITY_TIMELINE)) + ".",
        f"The city's newspaper, the {md['paper']}, was founded in {md['paper_founded']} and "
        f"appears every {md['paper_day']}; its editor is {md['editor']}. Local news and weather "
        f"are broadcast by {md['radio']} on {md['frequency']} megahertz.",
    ])

    biggest = max(PARKS, key=lambda p: int(p.hectares.split()[0]))
    parks = Section("parks", "Parks", [
        f"The largest of the city's parks is {biggest.name}. "
        + " ".join(f"{p.name} covers {p.hectares} in {p.district} and includes {p.feature}."
                   for p in PARKS),
    ])

    cv = CIVIC
    civic = Section("civic", "Civic Buildings and Services", [
        f"City Hall was built in {cv['city_hall_year']} on {cv['square']}. Its clock tower is "
        f"{cv['tower']} tall, and its bell is called {cv['bell']}.",
        f"Harlan Skyport opened in {cv['skyport_opened']} in Harlan Flats and has "
        f"{cv['launch_pads']}. Drinking water comes from the {cv['reservoir']}, which holds "
        f"{cv['reservoir_volume']}. The city runs {cv['fire_stations']}, and since "
        f"{cv['twinned']} it has been twinned with the town of {cv['twin']}.",
        f"Electricity comes from the {cv['hydro']} at the foot of the falls, which generates "
        f"{cv['hydro_output']}, and household recycling is collected every "
        f"{cv['recycling_day']}. "
        f"The largest employer is the {ec['employer']}, with {ec['workers']}. {ec['hospital']} "
        f"has {ec['beds']}, and the weekly farmers' market fills {cv['square']} every "
        f"{ec['market_day']}.",
    ])

    return Document(f"{cy['name']} Municipal Almanac, {cy['edition_year']} Edition",
                    [intro, districts, bridges, mayors, festivals, libraries, schools, trams,
                     landmarks, history, parks, council, civic])


def meridian_questions(rng: random.Random) -> QuestionSet:
    qs = QuestionSet("meridian", rng)
    cy, cv = CITY, CIVIC
    dist = lambda n: by_name(DISTRICTS, n)  # noqa: E731
    bridge = lambda n: by_name(BRIDGES, n)  # noqa: E731
    fest = lambda n: by_name(FESTIVALS, n)  # noqa: E731
    lib = lambda n: by_name(LIBRARIES, n)  # noqa: E731
    tram = lambda c: by_name(TRAMS, c, "colour")  # noqa: E731
    school = lambda n: by_name(SCHOOLS, n)  # noqa: E731
    mayor = lambda n: by_name(MAYORS, n)  # noqa: E731
    surname = lambda name: name.split()[-1]  # noqa: E731

    qs.ask("founding", "Who is the City Clerk of Meridian Falls?", cy["clerk"],
           surname(cy["clerk"]))
    qs.ask("founding", "On what date was Meridian Falls founded?", cy["founded"])
    qs.ask("founding", "How far does the Oriel River drop at the falls?", cy["drop"])
    qs.ask("founding", "What is the city flower of Meridian Falls?", cy["flower"])

    qs.ask("districts", f"How many residents did the {cy['census_year']} census count in Meridian "
                        f"Falls?", population(sum(d.population for d in DISTRICTS)))
    qs.ask("districts", "What is the population of the Millrace district?",
           population(dist("Millrace").population))
    qs.ask("districts", "Which district of Meridian Falls is the least populous?",
           min(DISTRICTS, key=lambda d: d.population).name)
    qs.ask("districts", "Who is the district councillor for Lantern Row?",
           dist("Lantern Row").councillor, surname(dist("Lantern Row").councillor))
    qs.choose("districts", "Which Meridian Falls district has a community orchard of 300 pear "
                           "trees?", "Thistledown", ["Old Quay", "Lantern Row", "Harlan Flats"])

    qs.ask("bridges", "What does the Glasswater Footbridge span?",
           bridge("Glasswater Footbridge").spans.removeprefix("the "))
    qs.ask("bridges", "How long is the Saint Odile Viaduct?", bridge("Saint Odile Viaduct").length)
    qs.ask("bridges", "In what year did Wren's Step Bridge open?",
           bridge("Wren's Step Bridge").opened)
    qs.ask("bridges", "Who designed Pell's Folly?", "Ezra Pell")

    qs.ask("mayors", "Who was mayor of Meridian Falls from 2207 to 2219?",
           "Priya Lindgren-Osei", "Lindgren-Osei")
    qs.ask("mayors", "Who is the current mayor of Meridian Falls?", MAYORS[-1].name,
           surname(MAYORS[-1].name))
    qs.ask("mayors", "Which mayor created the Greywell Reservoir?", "Benedek Salonen-Hart",
           "Salonen-Hart")
    qs.choose("mayors", "Which mayor founded the Lanternwake Festival?",
              mayor("Marcus Oduya-Fairweather").name,
              ["Cordelia Ashby-Ravel", "Priya Lindgren-Osei", "Tamsin Abernathy-Kohl"])

    qs.ask("festivals", "On what date is the Thaw Fair held?", fest("Thaw Fair").date)
    qs.ask("festivals", "How many glass lanterns are set afloat during the Lanternwake Festival?",
           "4,000")
    qs.ask("festivals", "In which district is the Night Market of Saint Odile centred?",
           fest("Night Market of Saint Odile").district)
    qs.ask("festivals", "About how many visitors does Founders' Day draw?",
           fest("Founders' Day").visitors)

    qs.ask("libraries", "At what time does the Central Library close on weekdays?",
           lib("Central Library").weekdays.split(" to ")[1])
    qs.ask("libraries", "Which library building opens on Sundays?",
           next(x.name for x in LIBRARIES if x.sunday))

    qs.ask("schools", "Who leads Millrace Technical College?",
           school("Millrace Technical College").head, "Kinnunen-Obi")
    qs.ask("schools", "In what year was Calloway Grammar School founded?",
           school("Calloway Grammar School").founded)

    qs.ask("trams", "How much does a single tram fare cost in Meridian Falls?", TRAM_FARE["fare"])
    qs.ask("trams", "How many stops does the Teal Line serve?", tram("Teal").stops)
    qs.ask("trams", "In what year did the Vermilion Line open?", tram("Vermilion").opened)
    qs.choose("trams", "Which tram line crosses the Saint Odile Viaduct?", "Indigo Line",
              ["Amber Line", "Teal Line", "Vermilion Line"])

    qs.ask("landmarks", "How many steps lead up to the Falls Lookout?", "187 steps")
    qs.ask("history", "In what year did the Great Flood leave Old Quay under water?",
           next(y for y, e in CITY_TIMELINE if "Great Flood" in e))
    qs.ask("history", "On what frequency does Radio Oriel broadcast?", MEDIA["frequency"])
    qs.ask("parks", "How large is Confluence Park?", by_name(PARKS, "Confluence Park").hectares)

    qs.ask("council", "In which room of City Hall does the city council meet?",
           COUNCIL["chamber"])
    qs.ask("council", "How long is the course of the Gorge Run?", SPORT["race_length"])

    qs.ask("civic", "What is the bell in the City Hall clock tower called?", cv["bell"])
    qs.ask("civic", "In what year did Harlan Skyport open?", cv["skyport_opened"])
    qs.ask("civic", "How much water does the Greywell Reservoir hold?", cv["reservoir_volume"])
    qs.ask("civic", "With which town is Meridian Falls twinned?", cv["twin"])
    qs.ask("civic", "How much electricity does the Oriel Hydro Station generate?",
           cv["hydro_output"])
    return qs


# --------------------------------------------------------------------------
# Cross-corpus questions (need both documents)
# --------------------------------------------------------------------------

def cross_questions(rng: random.Random) -> QuestionSet:
    """Each question names an ``orbital`` and a ``meridian`` evidence phrase: a linking fact
    that only that corpus states (checked in ``verify``)."""
    qs = QuestionSet("cross", rng)
    oriel = by_name(BRIDGES, "the Oriel River", "spans")
    ship_of_bridge = next(s for s in SHIPS if oriel.name in s.detail)
    former_mayor = by_name(MAYORS, "a former freight captain", "epithet")
    heron = next(s for s in SHIPS if former_mayor.name in s.detail)
    calloway = next(s for s in STATIONS if CITY["founder"] in s.detail)
    lantern_code = next(cg for cg in CARGO if "Lanternwake Festival" in cg.contents)
    lanternwake = by_name(FESTIVALS, "Lanternwake Festival")
    indigo = by_name(TRAMS, "Indigo", "colour")
    shuttle_station = next(s for s in STATIONS if indigo.ends[1] in s.detail)
    kestrel_ship = next(s for s in SHIPS if "district of Meridian Falls" in s.detail)
    kestrel = by_name(DISTRICTS, kestrel_ship.name)
    founder_branch = next(lib for lib in LIBRARIES if COOP["founders"][0] in lib.note)
    amber = next(t for t in TRAMS if f"{t.colour} Line" in former_mayor.deed)
    flood_wall = next(d.name for d in DISTRICTS
                      if f"flood wall along {d.name}" in former_mayor.deed)

    qs.ask("", "The Orbital Freight Cooperative ship named after the bridge that spans the Oriel "
               "River is captained by whom?", ship_of_bridge.captain, "Achterberg-Vey",
           orbital=[ship_of_bridge.captain], meridian=[CITY["river"]])
    qs.ask("", "At which station is the ship named after the bridge over the Oriel River based?",
           ship_of_bridge.home, orbital=[f"named after the {oriel.name}"],
           meridian=[CITY["river"]])
    qs.ask("", f"In what year did the former captain of the {heron.name} become mayor of "
               f"Meridian Falls?", former_mayor.start,
           orbital=[heron.name], meridian=[f"served from {former_mayor.start}"])
    qs.ask("", f"Which Meridian Falls tram line opened while the former commander of the "
               f"{heron.name} was mayor?", f"{amber.colour} Line", amber.colour,
           orbital=[heron.name], meridian=[f"{amber.colour} Line"])
    qs.ask("", f"What is the home station of the ship once commanded by the Meridian Falls mayor "
               f"who served from {former_mayor.start} to {former_mayor.end}?", heron.home,
           orbital=[heron.name], meridian=[f"{former_mayor.start} to {former_mayor.end}"])
    qs.ask("", "How many docking bays does the Cooperative station named after the founder of "
               "Meridian Falls have?", calloway.bays,
           orbital=[f"{calloway.bays} docking bays"], meridian=["Meridian Falls was founded"])
    qs.ask("", f"On what date is the festival whose lantern glass travels under cargo code "
               f"{lantern_code.code} held?", lanternwake.date,
           orbital=[lantern_code.code], meridian=[lanternwake.date])
    qs.ask("", "Who is the station master of the Cooperative station that receives shuttles from "
               "the skyport served by the Indigo tram line of Meridian Falls?",
           shuttle_station.master,
           "Fenwick-Ure", orbital=[shuttle_station.master], meridian=["Indigo Line"])
    qs.ask("", f"What is the population of the Meridian Falls district after which "
               f"{kestrel_ship.captain}'s ship is named?", population(kestrel.population),
           orbital=[kestrel_ship.captain], meridian=[population(kestrel.population)])
    qs.ask("", "At what time on Saturdays does the Meridian Falls library branch named after a "
               "co-founder of the Orbital Freight Cooperative close?",
           founder_branch.saturday.split(" to ")[1],
           orbital=[COOP["name"], f"founded on {COOP['founded']}"],
           meridian=[founder_branch.name])
    qs.choose("", "To which class does the Cooperative ship named after the bridge that spans the "
                  "Oriel River belong?", ship_of_bridge.ship_class,
              sorted({s.ship_class for s in SHIPS} - {ship_of_bridge.ship_class})[:3],
              orbital=[f"named after the {oriel.name}"], meridian=[CITY["river"]])
    qs.choose("", f"As mayor of Meridian Falls, the former commander of the {heron.name} rebuilt "
                  f"the flood wall along which district?", flood_wall,
              [d.name for d in DISTRICTS if d.name != flood_wall][:3],
              orbital=[heron.name], meridian=["flood wall"])
    return qs


# --------------------------------------------------------------------------
# Verification and output
# --------------------------------------------------------------------------

def verify(texts: dict[str, str], docs: dict[str, Document],
           sets: dict[str, QuestionSet]) -> list[str]:
    """Return a list of problems (empty when everything checks out)."""
    problems: list[str] = []
    for name, qs in sets.items():
        records = qs.records()
        low, high = QUESTION_COUNTS[name]
        if not low <= len(records) <= high:
            problems.append(f"{name}: {len(records)} questions, expected {low} to {high}")
        if len({r["question"] for r in records}) != len(records):
            problems.append(f"{name}: duplicate question text")
        for q, rec in zip(qs.items, records):
            qid = rec["id"]
            if name == "cross":
                where = {k: texts[k] for k in ("orbital", "meridian")}
                haystack = "\n".join(where.values())
                for corpus, phrases in q.evidence.items():
                    other = next(k for k in where if k != corpus)
                    for phrase in phrases:
                        if phrase not in where[corpus]:
                            problems.append(f"{qid}: evidence {phrase!r} missing from {corpus}")
                        if phrase in where[other]:
                            problems.append(f"{qid}: evidence {phrase!r} also in {other}")
                if set(q.evidence) != set(where):
                    problems.append(f"{qid}: needs evidence from both corpora")
            else:
                haystack = docs[name].section(q.section).render()
            if q.choices is not None:
                if len(q.choices) != len(LETTERS):
                    problems.append(f"{qid}: expected {len(LETTERS)} choices")
                if q.correct_text not in haystack:
                    problems.append(f"{qid}: correct choice {q.correct_text!r} not in corpus")
                if q.answers != [LETTERS[q.choices.index(q.correct_text)]]:
                    problems.append(f"{qid}: answer letter does not match correct choice")
            else:
                for answer in q.answers:
                    if answer not in haystack:
                        problems.append(f"{qid}: answer {answer!r} not found verbatim")
            if not q.question.endswith("?"):
                problems.append(f"{qid}: question does not end with '?'")

        if name in docs:  # spread: each third of the document must be asked about
            text = texts[name]
            thirds = [0, 0, 0]
            for q in qs.items:
                sec = docs[name].section(q.section).render()
                thirds[min(2, 3 * (text.index(sec) + len(sec) // 2) // len(text))] += 1
            print(f"{name}: questions per third of the document (start/middle/end): {thirds}",
                  file=sys.stderr)
            if min(thirds) < 5:
                problems.append(f"{name}: questions not spread over the document: {thirds}")
    return problems


def build() -> tuple[dict[str, str], dict[str, Document], dict[str, QuestionSet]]:
    rng = random.Random(SEED)
    docs = {"orbital": orbital_document(rng), "meridian": meridian_document(rng)}
    sets = {"orbital": orbital_questions(rng), "meridian": meridian_questions(rng),
            "cross": cross_questions(rng)}
    texts = {k: d.render() for k, d in docs.items()}
    return texts, docs, sets


def write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="verify only: write nothing, fail if the files on disk are stale")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = parser.parse_args(argv)

    texts, docs, sets = build()
    problems = verify(texts, docs, sets)
    if problems:
        print("make_corpora: self-check FAILED:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1

    files = {f"{k}/corpus.md": t for k, t in texts.items()}
    for name, qs in sets.items():
        files[f"{name}/questions.jsonl"] = "".join(
            json.dumps(r, ensure_ascii=True) + "\n" for r in qs.records())
    stale = []
    for rel, content in files.items():
        path = args.out / rel
        if args.check:
            on_disk = path.read_text(encoding="utf-8") if path.exists() else None
            if on_disk != content:
                stale.append(rel)
        else:
            write(path, content)
        print(f"{'checked' if args.check else 'wrote'} {rel}: {len(content)} chars"
              + (f", {content.count(chr(10))} questions" if rel.endswith(".jsonl") else ""),
              file=sys.stderr)
    if stale:
        print(f"make_corpora: out of date (rerun without --check): {', '.join(stale)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
