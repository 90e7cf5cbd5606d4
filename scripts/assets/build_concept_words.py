"""Build captioner/concept_words.tsv: one caption word per ImageNet-1k class, from WordNet's hypernyms.

The encoder's own ImageNet head recognises objects the caption data may never name (an espresso, a
reflex camera); mapped to the word a person would write ("coffee", "camera") its class probabilities
become evidence for novel-object captioning (captioner/concepts.py). The table is generated, not
hand-typed, so the rule below is what to review and rerun.

Regenerate (WordNet 3.0 from Debian, the 1000 class wnids from timm's wheel, which is read, not imported):

    apt-get update -q && apt-get install -y -q --no-install-recommends wordnet-base
    pip download --no-deps timm -d /tmp/timmwheel
    python scripts/assets/build_concept_words.py --synsets /tmp/timmwheel/timm-*.whl \
        --wordnet /usr/share/wordnet --output captioner/concept_words.tsv

Rule, deterministic given the two inputs:
  1. The classes are timm's imagenet_synsets.txt (1000 wnids, sorted: the standard class-index order,
     which is the order of the EfficientNet weights' fc layer). A wnid "n01440764" is noun synset
     01440764 of WordNet 3.0's data.noun.
  2. From each class's synset, walk up its hypernyms (and instance hypernyms) breadth first, level by
     level, parents in the order data.noun lists them, so the nearest match wins. The first synset whose
     head word (first lemma, case-insensitive) is in CURATED for that synset's lexicographer file
     decides: the class gets the curated caption word, or no word when the entry maps to "". Keying on
     the lexicographer file keeps homographs apart (the bird crane from the machine crane, the monitor
     lizard from the computer monitor). A class whose walk reaches the root unmatched gets no word.
  3. OVERRIDES (by wnid) replace the result for the few classes whose WordNet sense or ancestry
     disagrees with what the class's images show.
The class name in the table is the class synset's first lemma with underscores as spaces.
"""
from __future__ import annotations

import argparse
import re
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# lexicographer file numbers of WordNet 3.0 (lexnames(5WN)) that CURATED uses
ANIMAL, ARTIFACT, COMMUNICATION, FOOD, OBJECT, PERSON, PLANT, SUBSTANCE = 5, 6, 10, 13, 17, 18, 20, 27


def entries(text: str) -> dict[str, str]:
    """'lemma' (the word is the lemma), 'lemma:word' or 'lemma:' (stop here, no word) -> {lemma: word}."""
    table = {}
    for token in text.split():
        lemma, colon, word = token.partition(":")
        table[lemma.lower()] = word if colon else lemma
    return table


CURATED: dict[int, dict[str, str]] = {
    ANIMAL: entries("""
        fish goldfish shark ray:stingray eel
        bird cock:rooster hen:chicken ostrich hawk eagle vulture owl peacock parrot hummingbird toucan
        duck goose swan stork heron flamingo pelican penguin
        salamander frog turtle lizard crocodile alligator dinosaur snake
        trilobite:fossil spider harvestman:spider scorpion tick:insect centipede:insect
        insect beetle ladybug fly bee ant grasshopper cricket:grasshopper cockroach dragonfly damselfly:dragonfly
        butterfly
        jellyfish sea_anemone:anemone coral worm snail slug sea_slug:slug conch:shell chambered_nautilus:shell
        crab hermit_crab:crab lobster crayfish:lobster starfish sea_urchin:urchin
        kangaroo koala wombat platypus whale killer_whale:whale seal
        dog wild_dog:dog wolf coyote hyena fox cat cougar lynx leopard snow_leopard:leopard jaguar lion tiger
        cheetah bear mongoose meerkat
        rabbit hare:rabbit hamster porcupine squirrel marmot beaver
        horse zebra swine:pig hippopotamus:hippo cattle:cow water_buffalo:buffalo bison:buffalo
        sheep wild_sheep:sheep goat antelope camel llama
        weasel mink:weasel polecat:weasel black-footed_ferret:ferret otter skunk badger armadillo sloth
        orangutan gorilla chimpanzee lesser_ape:monkey monkey lemur elephant lesser_panda:panda giant_panda:panda
    """),
    ARTIFACT: entries("""
        car ambulance cab:taxi jeep limousine truck fire_engine:truck moving_van:truck snowplow:truck
        half_track:truck van bus train locomotive:train freight_car:train passenger_car:train
        streetcar:trolley bicycle:bike tricycle unicycle moped:scooter motor_scooter:scooter
        tractor farm_machine:tractor forklift go-kart:kart golfcart:cart snowmobile sled cart
        jinrikisha:rickshaw barrow:wheelbarrow shopping_cart:cart recreational_vehicle:camper mobile_home:trailer
        tank boat ship sailboat sailing_vessel:sailboat submarine wreck airplane:plane warplane:plane
        airship:blimp balloon parachute missile:rocket projectile:rocket space_shuttle:shuttle
        guitar piano organ accordion banjo cello violin harp harmonica flute panpipe:flute sax:saxophone
        oboe bassoon cornet:trumpet french_horn:horn trombone drum steel_drum:drum drumstick:drum gong
        chime:bell maraca:maracas marimba:xylophone
        camera telescope binoculars projector microphone loudspeaker:speaker radio
        cassette:tape television home_theater:television entertainment_center:television screen monitor:computer
        computer notebook:laptop laptop keyboard typewriter_keyboard:typewriter space_bar:keyboard mouse
        printer photocopier:copier modem ipod telephone:phone remote_control:remote joystick switch scoreboard
        clock watch stopwatch:watch hourglass sundial parking_meter:meter odometer:dashboard
        magnetic_compass:compass scale rule:ruler slide_rule:ruler barometer abacus
        binder chair throne bench sofa:couch bed baby_bed:crib table desk bookcase:bookshelf cabinet
        file:cabinet chest_of_drawers:dresser wardrobe lamp candle spotlight:light torch
        jack-o'-lantern:pumpkin pillow quilt:blanket towel dishrag:towel handkerchief rug doormat:mat curtain
        window_shade:window window_screen:window shoji:door sliding_door:door turnstile
        refrigerator microwave toaster stove oven dutch_oven:pot dishwasher washer vacuum iron
        coffee_maker:coffee coffee_mug:coffee coffeepot:coffee teapot waffle_iron:waffle
        sewing_machine:sewing space_heater:heater electric_fan:fan hand_blower:dryer radiator
        pot crock_pot:pot pan wok spatula ladle wooden_spoon:spoon strainer corkscrew
        cocktail_shaker:shaker saltshaker:shaker
        bottle bottlecap:cap jug pitcher goblet:glass beer_glass:beer measuring_cup:cup bowl mortar:bowl
        petri_dish:dish plate_rack:rack tray bucket barrel rain_barrel:barrel bathtub tub washbasin:sink
        vase beaker can basket crate chest carton:box safe mailbox envelope packet:package
        backpack purse wallet ashcan:trash soap_dispenser:soap piggy_bank:piggy
        jersey:shirt sweatshirt sweater suit coat cloak poncho robe vestment:robe gown:dress
        academic_gown:gown skirt jean:jeans swimsuit maillot:swimsuit bikini brassiere:bra vest apron
        umbrella bib diaper pajama:pajamas military_uniform:uniform kimono
        headdress:hat hat helmet pickelhaube:helmet mask oxygen_mask:mask necktie:tie feather_boa:scarf stole:scarf
        mitten:glove sock christmas_stocking:stocking wig sunglass:sunglasses sunglasses
        shoe sandal boot footwear:shoe necklace armor breastplate:armor shield
        gun rifle bow cannon scabbard:sword holster guillotine
        hammer shovel broom swab:mop plunger screwdriver screw nail hook thimble chain knot:rope padlock:lock
        combination_lock:lock safety_pin:pin buckle ax:axe knife power_drill:drill chain_saw:chainsaw
        lawn_mower:lawnmower plow carpenter's_kit:toolbox paintbrush:brush pen pencil_sharpener:pencil
        pencil_box:box rubber_eraser:eraser lighter matchstick:match mousetrap:trap whistle snorkel
        ball punching_bag: baseball basketball volleyball racket ski puck dumbbell barbell
        puzzle paddle reel teddy pinwheel swing carousel maze
        band_aid:bandage syringe stethoscope stretcher crutch
        lipstick face_powder:makeup perfume lotion sunscreen hair_spray:hairspray
        building castle palace church mosque stupa:temple monastery library restaurant shop:store
        grocery_store:store prison factory greenhouse barn apiary:beehive birdhouse tent yurt:tent
        theater planetarium:building bridge dam dock pier fountain altar dome roof vault:ceiling fence
        stone_wall:wall memorial:monument obelisk:monument totem_pole:totem arch patio stage honeycomb
        beacon:lighthouse water_tower:tower bannister:railing manhole_cover:manhole
        car_wheel:wheel potter's_wheel:pottery flagpole:flag pole gas_pump:gas cash_machine:atm
        vending_machine:machine slot crane drilling_platform:rig velvet:fabric wool:yarn
        plastic_bag:bag mailbag:bag sleeping_bag:bag car_mirror:mirror seat_belt:seatbelt
        toilet_seat:toilet fire_screen:fireplace mosquito_net:net spider_web:web
        lampshade:lamp
    """),
    COMMUNICATION: entries("sign traffic_light:light comic_book:comic book_jacket:book web_site:website"),
    FOOD: entries("""
        plate:food trifle:dessert ice_lolly:popsicle ice_cream:dessert bread bagel pretzel
        hamburger:burger hotdog soup stew pizza potpie:pie burrito guacamole meat_loaf:meatloaf
        spaghetti_sauce:pasta chocolate_sauce:chocolate dough hay menu
        vegetable potato cabbage broccoli cauliflower zucchini squash cucumber artichoke pepper
        mushroom apple strawberry orange lemon fig pineapple banana pomegranate edible_fruit:fruit
        coffee wine beverage:drink
    """),
    OBJECT: entries("""
        mountain volcano cliff reef geyser lakeside:lake seashore:beach sandbar:beach promontory:cliff valley
        bubble
    """),
    PERSON: entries("ballplayer:baseball groom diver"),
    PLANT: entries("flower fungus:mushroom corn ear:corn acorn buckeye:nut rapeseed:field"),
    SUBSTANCE: entries("toilet_tissue:paper"),
}

# wnid -> word where WordNet's sense or ancestry is not what the class's images show
OVERRIDES = {
    "n01871265": "elephant",  # tusker: WordNet puts it straight under mammal
    "n02892201": "plaque",  # brass (memorial tablet); "brass" is also the instrument family
    "n07930864": "cup",  # cup: WordNet's sense is the drink (punch), the images are cups
    "n03459775": "car",  # grille: the images are the fronts of cars
    "n03803284": "dog",  # muzzle: the images are dogs wearing one
    "n04485082": "camera",  # tripod: photos of tripods show the camera on it
    "n04592741": "plane",  # wing: the images are aircraft wings, often seen from a window seat
}

WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Synset:
    lemmas: tuple[str, ...]
    lexfile: int
    hypernyms: tuple[str, ...]  # offsets, hypernyms then instance hypernyms, as data.noun lists them


def read_nouns(wordnet: Path) -> dict[str, Synset]:
    """Offset -> Synset from data.noun (format: wndb(5WN)); only what the walk needs."""
    path = wordnet / "data.noun"
    if not path.is_file():
        sys.exit(f"{path} not found: install wordnet-base (see this script's docstring) or pass --wordnet")
    nouns = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        fields = line.split(" | ", 1)[0].split()
        count = int(fields[3], 16)
        lemmas = tuple(fields[4:4 + 2 * count:2])
        pointers_at = 4 + 2 * count
        pointers = fields[pointers_at + 1:pointers_at + 1 + 4 * int(fields[pointers_at])]
        hypernyms = tuple(pointers[i + 1] for i in range(0, len(pointers), 4) if pointers[i] in ("@", "@i"))
        nouns[fields[0]] = Synset(lemmas, int(fields[1]), hypernyms)
    return nouns


def read_synsets(path: Path) -> list[str]:
    """The 1000 class wnids in class-index order, from timm's wheel or its imagenet_synsets.txt."""
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("_info/imagenet_synsets.txt")]
            if len(names) != 1:
                sys.exit(f"{path}: expected one .../_info/imagenet_synsets.txt inside, found {names}")
            text = wheel.read(names[0]).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    wnids = text.split()
    if len(wnids) != 1000 or len(set(wnids)) != 1000 or not all(WNID.fullmatch(w) for w in wnids):
        sys.exit(f"{path}: expected 1000 distinct wnids, got {len(wnids)} ({len(set(wnids))} distinct)")
    if wnids != sorted(wnids):
        sys.exit(f"{path}: wnids are not sorted, so they are not the standard class-index order")
    return wnids


def caption_word(offset: str, nouns: dict[str, Synset]) -> tuple[str, str]:
    """(word, "head (lexfile)" of the curated entry that decided it) by the breadth-first hypernym walk;
    ("", "") when the walk reaches the root unmatched."""
    level, seen = [offset], {offset}
    while level:
        for node in level:
            synset = nouns[node]
            head = synset.lemmas[0].lower()
            if head in CURATED.get(synset.lexfile, {}):
                return CURATED[synset.lexfile][head], f"{head} ({synset.lexfile})"
        parents = [parent for node in level for parent in nouns[node].hypernyms]
        level = [parent for parent in dict.fromkeys(parents) if parent not in seen]
        seen.update(level)
    return "", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synsets", type=Path, required=True, help="timm wheel, or its imagenet_synsets.txt")
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict dir")
    parser.add_argument("--output", type=Path, default=Path("captioner/concept_words.tsv"))
    args = parser.parse_args()

    wnids = read_synsets(args.synsets)
    nouns = read_nouns(args.wordnet)
    if unknown := [w for w in wnids if w[1:] not in nouns]:
        sys.exit(f"{len(unknown)} wnids are not WordNet 3.0 noun synsets, e.g. {unknown[:3]}")
    if stray := sorted(set(OVERRIDES) - set(wnids)):
        sys.exit(f"OVERRIDES name wnids that are not ImageNet-1k classes: {stray}")

    rows, deciders = [], Counter()
    for index, wnid in enumerate(wnids):
        word, head = caption_word(wnid[1:], nouns)
        if wnid in OVERRIDES:
            word, head = OVERRIDES[wnid], "override"
        deciders[head] += 1
        name = nouns[wnid[1:]].lemmas[0].replace("_", " ")
        rows.append(f"{index}\t{wnid}\t{name}\t{word}")
    args.output.write_text("index\twnid\tclass\tword\n" + "\n".join(rows) + "\n", encoding="utf-8")

    words = Counter(row.rsplit("\t", 1)[1] for row in rows)
    named = 1000 - words.pop("", 0)
    print(f"wrote {args.output}: {named}/1000 classes have a word, {len(words)} distinct words")
    print(", ".join(f"{w} {n}" for w, n in sorted(words.items(), key=lambda item: (-item[1], item[0]))))
    unused = sorted(key for lexfile, table in CURATED.items() for lemma in table
                    if (key := f"{lemma} ({lexfile})") not in deciders)
    if unused:
        print(f"curated entries that decided no class: {', '.join(unused)}")


if __name__ == "__main__":
    main()
