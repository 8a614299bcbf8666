"""Embedded word lists for RULER-style tasks (RULER draws from the `wonderwords` lists; nothing is downloaded here)."""

from __future__ import annotations

import functools
import itertools

ADJECTIVES = """
able absent abundant acid actual adorable afraid agile alert alive amber ample ancient angry annual anxious
apparent arctic ardent aromatic artful ashamed atomic austere average awake aware awful balmy bare basic
bashful bitter bland blank bleak blissful blond blunt bold bony boring bossy brave brief bright brisk broad
broken bumpy busy calm candid capable careful careless casual cautious charming cheap cheerful chief chilly
civic civil classic clean clear clever close cloudy clumsy coarse cold common complex content cool cosmic
costly cozy crafty crazy creamy crisp crooked crowded cruel crude cuddly curious curly curved cute damp dapper
daring dark dazzling dear decent deep defiant dense devoted digital diligent direct dirty distant divine dizzy
double dreamy dry dual dull dusty eager early earnest easy eerie elastic elderly elegant eloquent empty
endless enormous entire equal erratic even evil exact exotic expert faint fair faithful famous fancy fast
fatal fearless feeble fervent festive fierce filthy final fine firm fiscal flat flawless fluffy foggy fond
formal fragile frail frank free fresh friendly frosty frozen frugal full funny fuzzy gentle genuine giant
gifted glad gleaming glossy golden good graceful grand grateful grave greasy great greedy green grim grumpy
guilty hairy handy happy hardy harsh hasty healthy heavy hectic helpful hidden high hollow honest hopeful huge
humble humid hungry icy ideal idle immense inner innocent intense jagged jolly jovial joyful juicy junior keen
kind lame large lasting late lavish lazy legal level light likely limp liquid little lively livid lone long
loose loud lovely loyal lucid lucky lunar lush mad magic major mature meager mellow merry messy mild minor
misty modern modest moist moral muddy murky mute narrow native naughty neat needy nervous new nice nimble
noble noisy normal numb obvious odd oily old open optimal orange ornate outer oval polite pale past patient
peaceful perfect petty plain playful pleasant plump polar poor portly posh precious pretty prime private proud
prudent puny pure quaint quick quiet radiant rapid rare raw ready real regal remote rich rigid ripe robust
rosy rough round royal rude rural rusty sacred sad safe salty sandy scarce secret serene severe shaggy shallow
sharp shiny short shy silent silky silly simple sincere sleepy slim slow small smart smooth snug soft solar
solid somber sour spare spicy splendid spotless square stable stale steady steep sticky stiff stormy strange
strict strong sturdy subtle sudden sunny super sweet swift tall tame tart tender tense thick thin thirsty tidy
tight timid tiny tough tragic tranquil tricky trim true trusty ugly ultimate unique upbeat upset urban usable
useful vague vain valid vast velvet vibrant vital vivid warm wary weak wealthy weary wet whole wicked wide
wild windy wise witty wooden worthy young zany zealous
""".split()

NOUNS = """
abbey acorn actor advice agent airport alarm album alley anchor angle animal ankle answer apple apron arch
arena armor arrow artist ash atlas attic author avenue badge baker ball balloon banana band banjo bank barn
barrel basket bat beach beacon beam bean bear beard bed bee beetle bell belt bench berry bicycle bird biscuit
blanket blossom board boat bone book boot bottle boulder bowl box bracelet branch bread brick bridge broom
brook brush bubble bucket buffalo bugle building bulb bull bunny butter button cabin cable cactus cake camel
camera camp canal candle cannon canoe canvas canyon cap captain car card carpet carrot cart castle cat cave
cellar chair chalk channel chapel cheese cherry chest chicken chimney circle city clock cloud clover coach
coast coat coconut coffee coin comet compass cookie copper coral corner cottage cotton cousin cow crab crane
crayon creek cricket crown crystal cup curtain cushion dagger daisy dancer deer desert desk diamond dinner
doctor dog doll dolphin donkey door dove dragon drawer dream dress drum duck eagle earth elbow elephant elm
emerald engine envelope falcon farm feather fence fern ferry field fig finger fire fish flag flame flute fog
forest fork fountain fox frog fruit galaxy garden garlic gate gem ghost giraffe glacier glass glove goat gold
goose grape grass guitar hammer harbor harp hat hawk heart hedge helmet hill hive honey hook horizon horn
horse hotel house island ivory jacket jar jelly jewel judge jungle kettle key king kite kitten knife ladder
lake lamp lantern lawyer leaf lemon letter library lily lion lizard lobster lock locket magnet mango map
marble market meadow melon mirror monkey moon mountain mouse mule museum needle nest net novel nut oak ocean
office olive onion orchard otter owl oyster paddle palace panda paper parrot peach pearl pebble pencil penguin
pepper piano pigeon pillow pilot pine pirate planet plate plum pocket poem pond pony potato prince puppet
puzzle queen quilt rabbit radio rain ribbon river road robin rocket roof rose ruby saddle sail salmon sand
scarf school scroll sea seal shadow shark sheep shell ship shoe shovel silver singer sister sky snail snake
sparrow spider spoon squirrel stable star statue stone storm stove stream street sugar summit sun swan sword
table tail teacher temple tent thread throne tiger timber tomato tower toy tractor train tree trumpet tulip
tunnel turtle umbrella valley vase violin wagon wall walnut wand whale wheel whistle window wing wizard wolf
worm yacht zebra
""".split()

VERBS = """
accept admire advise agree allow amuse announce appear applaud argue arrive attach attend avoid bake balance
bathe battle beg behave belong bless blink boast boil borrow bounce breathe build bump burn bury calculate
camp carry carve chase cheer chew clap clean climb collect comb command compare complain confess connect
consider copy count crawl cross crush cycle dance decide deliver depend describe destroy develop dig discover
divide double drag dream dress drift drop dust earn educate embrace employ enjoy enter escape examine exist
expand explain explore fasten fetch file fill film fix flash float flood flow fold follow forgive gather gaze
glow grab greet grin grip guard guess guide hammer handle hang happen harm hatch heal heat help hike hover hug
hum hunt hurry identify ignore imagine improve include inform inject inspect invent invite itch jog join joke
judge juggle jump kick kneel knit knock label land laugh launch learn lift listen live load lock march marry
match measure melt memorize mend mix moan move nail name nest nod note notice obey observe obtain offer open
order own pack paddle paint park pass paste pause peel perform pinch plan plant play plead polish pour praise
pray preach prefer press pretend prevent print promise protect provide pull pump punch push puzzle quarrel
question race rain raise reach read realize recall receive record reduce reflect refuse regret rejoice relax
release remain remember remind repair repeat reply report rescue retire return rhyme rinse risk rob rock roll
rub rush sail satisfy save scatter scream search settle shave shelter shiver shop shrug sigh sign signal sing
sip skate sketch ski skip slide slip smash smell smile snore solve sort sparkle spill spin spray sprout
squeeze stamp stare steer stir store stretch stroll study suggest supply support surprise surround swim swing
talk tame taste teach tease tempt thank thrive tickle tie tip touch tour trace trade train travel treat
tremble trust try tumble turn twist type unite unlock unpack untie urge use vanish visit wait walk wander want
warn wash watch wave weigh welcome whisper wink wipe wish wobble wonder work worry wrap wrestle write yawn
yell zip zoom
""".split()


@functools.cache
def key_words() -> tuple[str, ...]:
    """Needle keys as in RULER: adjective-noun pairs (about 180K of them)."""
    return tuple(f"{a}-{n}" for a, n in itertools.product(ADJECTIVES, NOUNS))


@functools.cache
def plain_words() -> tuple[str, ...]:
    """Distinct single words (nouns, adjectives, verbs), in a fixed order."""
    return tuple(dict.fromkeys(NOUNS + ADJECTIVES + VERBS))


def word_pool(n: int) -> list[str]:
    """At least n distinct words: the single words first, then adjective-noun compounds when more are needed."""
    words = list(plain_words())
    if n <= len(words):
        return words
    return words + list(key_words()[: n - len(words)])
