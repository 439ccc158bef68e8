"""Deterministic generator for the task-classifier training set: writes training/data/train.jsonl."""
# ruff: noqa: E501  (template and word-pool tables read best one entry per line, however long)

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

__all__ = ["LABELS", "build", "main"]

LABELS = ("code", "reasoning", "creative", "summarization", "translation", "extraction", "qa", "chat")
SEED = 20240611
OUT = Path(__file__).resolve().parent / "data" / "train.jsonl"

# One module-level RNG, reseeded in build(), keeps every generator deterministic.
R = random.Random(SEED)


def pick(xs):
    return R.choice(xs)


def maybe(p: float) -> bool:
    return R.random() < p


# ---------------------------------------------------------------- surface noise
# Applied to every label alike so politeness, casing and filler words carry no label signal.
PREFIXES = ["", "", "", "", "Please ", "please ", "Can you ", "Could you ", "hey, ", "Hi! ", "Quick one: ",
            "I need help. ", "Hello, ", "ok so ", "Question: ", "Task: ", "Hey there. ", "Help me out: "]
SUFFIXES = ["", "", "", "", " Thanks!", " thanks", " thx", " Thank you.", " pls", " ASAP.", " :)",
            " Be concise.", " Keep it short.", " Please be detailed.", " ty", " Appreciate it!"]


def lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s and not s[:2].isupper() else s


def noisy(s: str, p: float = 0.35) -> str:
    """Randomly add a polite prefix/suffix, lowercase, or drop final punctuation."""
    if maybe(p):
        pre = pick(PREFIXES)
        if pre.endswith(("you ", "please ")):
            s = pre + lower_first(s)
        elif pre:
            s = pre + s
    if maybe(p * 0.6):
        s = s + pick(SUFFIXES)
    r = R.random()
    if r < 0.15:
        s = s.lower()
    elif r < 0.22:
        s = s.rstrip(".?!")
    return s


def num(lo: int, hi: int) -> int:
    return R.randint(lo, hi)


# ---------------------------------------------------------------- shared pools
FIRST = ["Olivia", "Liam", "Sofia", "Mateo", "Aisha", "Kenji", "Fatima", "Lukas", "Chloe", "Ravi", "Ingrid",
         "Tariq", "Mei", "Diego", "Hannah", "Kwame", "Yuki", "Pierre", "Zara", "Nikolai", "Amelia", "Omar",
         "Lucia", "Jonas", "Priyanka", "Samuel", "Elif", "Bongani", "Clara", "Hiro", "Leila", "Marco", "Nora",
         "Tomasz", "Isabel", "Ahmed", "Grace", "Felix", "Anjali", "Victor", "Maya", "Ethan", "Rosa", "Arjun"]
LAST = ["Nguyen", "Schmidt", "Okafor", "Rossi", "Tanaka", "Garcia", "Novak", "Johansson", "Haddad", "Patel",
        "Kowalski", "Moreau", "Silva", "Kim", "O'Brien", "Fischer", "Mensah", "Ivanova", "Costa", "Yamamoto",
        "Hernandez", "Dubois", "Larsen", "Ali", "Chen", "Murphy", "Bauer", "Ferreira", "Sato", "Adeyemi",
        "Walsh", "Lindqvist", "Rahman", "Petrov", "Morales", "Becker", "Abbott", "Reyes", "Khan", "Wright"]
COMPANIES = ["Northwind Labs", "Bluefin Robotics", "Copperleaf Health", "Meridian Freight", "Sunpeak Energy",
             "Orchard Software", "Halcyon Bank", "Redwood Media", "Quantix Systems", "Tidewater Foods",
             "Lumen Biotech", "Granite Insurance", "Skyline Air", "Verdant Farms", "Pinecrest Hotels",
             "Atlas Logistics", "Nimbus Cloud", "Silverline Motors", "Brightpath Education", "Coral Telecom",
             "Ironbridge Capital", "Fjord Outdoor", "Kestrel Security", "Maple & Oak Furniture", "Zenith Pharma"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Austin", "Melbourne", "Bogota", "Hamburg",
          "Seoul", "Marseille", "Cape Town", "Bangalore", "Reykjavik", "Denver", "Lyon", "Porto", "Manila",
          "Edinburgh", "Montreal", "Valencia", "Istanbul", "Auckland", "Chicago", "Prague", "Santiago",
          "Dublin", "Helsinki", "Jakarta", "Lagos", "Vancouver", "Milan", "Rotterdam", "Phoenix", "Kyoto"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def person() -> str:
    return f"{pick(FIRST)} {pick(LAST)}"


def date() -> str:
    m, d, y = R.randrange(12), num(1, 28), num(2015, 2026)
    style = R.randrange(4)
    if style == 0:
        return f"{MONTHS[m]} {d}, {y}"
    if style == 1:
        return f"{d} {MONTHS[m]} {y}"
    if style == 2:
        return f"{y}-{m + 1:02d}-{d:02d}"
    return f"{m + 1}/{d}/{y}"


def money() -> str:
    cur = pick(["$", "$", "€", "£", "¥"])
    v = pick([num(5, 999), num(1000, 99999), round(R.uniform(1, 500), 2)])
    return f"{cur}{v:,}" if isinstance(v, int) else f"{cur}{v:.2f}"


def email_addr(name: str) -> str:
    first, _, last = name.lower().replace("'", "").partition(" ")
    dom = pick(["gmail.com", "example.org", "outlook.com", "acme.io", "proton.me", "company.co.uk", "uni.edu"])
    return pick([f"{first}.{last}@{dom}", f"{first[0]}{last}@{dom}", f"{first}{num(1, 99)}@{dom}"])


def phone() -> str:
    return pick([f"({num(200, 999)}) {num(200, 999)}-{num(1000, 9999)}", f"+44 20 {num(1000, 9999)} {num(1000, 9999)}",
                 f"+49 30 {num(100000, 999999)}", f"{num(200, 999)}-{num(200, 999)}-{num(1000, 9999)}"])


# ---------------------------------------------------------------- generated documents
# Synthetic "pasted text" for summarization / extraction / translation prompts. The same documents
# appear under all three labels so the model must key on the instruction, not the document.
PRODUCTS = ["wireless earbuds", "standing desk", "air fryer", "hiking backpack", "robot vacuum", "e-reader",
            "espresso machine", "gaming mouse", "office chair", "electric toothbrush", "smartwatch",
            "camping tent", "mechanical keyboard", "rice cooker", "portable speaker", "yoga mat", "drone",
            "baby monitor", "winter jacket", "running shoes", "laptop stand", "water filter pitcher"]
PROS = ["the battery easily lasts all week", "setup took less than five minutes", "it feels really solid",
        "the sound is crisp and clear", "it is surprisingly quiet", "the design looks great in my living room",
        "customer support replaced a part within two days", "it was half the price of the competitors",
        "it's light enough to carry everywhere", "the app is intuitive", "it heats up really fast",
        "the instructions were clear", "it cleans better than my old one"]
CONS = ["it stopped working after three weeks", "the buttons feel cheap", "shipping took almost a month",
        "the app crashes constantly", "it is much louder than advertised", "one of the screws was missing",
        "the battery dies in a few hours", "the color looks nothing like the photos", "it smells of plastic",
        "support never answered my emails", "it overheats after twenty minutes", "the cable is way too short",
        "it's too heavy to move around"]


def doc_review() -> str:
    prod = pick(PRODUCTS)
    mood = R.randrange(3)
    parts = [pick([f"I bought this {prod} {pick(['last month', 'two weeks ago', 'for my birthday', 'on sale', 'after reading a lot of reviews'])}.",
                   f"Ordered the {pick(COMPANIES).split()[0]} {prod} {pick(['in March', 'a while ago', 'for my partner', 'to replace my old one'])}.",
                   f"Review of the {prod}:"])]
    if mood == 0:
        parts += [f"Honestly, {p}." for p in R.sample(PROS, 2)]
        parts.append(pick(["Would definitely recommend.", "Five stars from me.", "Best purchase this year.",
                           "Totally worth the money."]))
    elif mood == 1:
        parts += [f"Unfortunately {c}." for c in R.sample(CONS, 2)]
        parts.append(pick(["I'm returning it.", "Avoid.", "One star, and that's generous.",
                           "Really disappointed, I expected more."]))
    else:
        parts += [f"On the plus side, {pick(PROS)}.", f"However, {pick(CONS)}."]
        parts.append(pick(["It's okay for the price.", "Three stars.", "Mixed feelings overall.",
                           "Not sure I'd buy it again."]))
    return " ".join(parts)


def doc_news_business() -> str:
    co, p, city = pick(COMPANIES), person(), pick(CITIES)
    s = [f"{co}, the {city}-based {pick(['startup', 'manufacturer', 'retailer', 'software company', 'logistics firm'])}, "
         f"announced on {date()} that it {pick(['raised', 'secured', 'closed'])} {money()} million in a "
         f"{pick(['Series A', 'Series B', 'seed', 'growth'])} round led by {pick(COMPANIES)}.",
         f"Chief executive {p} said the money would be used to {pick(['hire 200 engineers', 'open offices in Asia', 'expand into three new markets', 'build a second factory', 'develop its mobile platform'])}.",
         f"The company reported revenue of {money()} million for the {pick(['first', 'second', 'third', 'fourth'])} quarter, up {num(3, 60)} percent from a year earlier.",
         f"Shares {pick(['rose', 'fell', 'jumped', 'slipped'])} {num(1, 19)}% in early trading after the announcement.",
         f"Analysts at {pick(COMPANIES)} had expected {pick(['weaker', 'stronger', 'similar'])} results, citing {pick(['rising interest rates', 'supply chain problems', 'strong consumer demand', 'a slowdown in China'])}.",
         f"The firm currently employs about {num(40, 9000):,} people and serves customers in {num(3, 60)} countries.",
         f"{p} founded the company in {num(1990, 2021)} together with {person()}, a former {pick(['banker', 'teacher', 'nurse', 'engineer', 'chef'])}.",
         f"Critics, including union representative {person()}, warned that the plan could lead to {pick(['layoffs', 'higher prices', 'weaker privacy protections', 'longer working hours'])}.",
         f"The deal is expected to close by {pick(MONTHS)} {num(2024, 2027)}, pending approval from regulators.",
         f"Last year the company {pick(['recalled 12,000 units', 'was fined by regulators', 'lost its largest client', 'acquired a smaller rival'])}, which {pick(['hurt its reputation', 'cost it millions', 'surprised investors'])}."]
    return " ".join(s[:1] + R.sample(s[1:], num(3, 7)))


def doc_news_local() -> str:
    city, p = pick(CITIES), person()
    topic = pick(["a new tram line", "a ban on cars in the old town", "rent controls", "a music festival",
                  "closing two public swimming pools", "a bike-sharing program", "a new football stadium",
                  "expanding the airport", "free school meals"])
    s = [f"The {city} city council voted {num(5, 12)}-{num(1, 6)} on {pick(WEEKDAYS)} to approve {topic}.",
         f"The project is expected to cost {money()} million and take {num(2, 7)} years to complete.",
         f"Mayor {p} called the decision {pick(['historic', 'a compromise', 'long overdue', 'a win for families'])}.",
         f"Opponents led by {person()} argued that the money should go to {pick(['housing', 'road repairs', 'schools', 'public safety', 'parks'])} instead.",
         f"Residents packed {num(2, 6)} public hearings, and more than {num(300, 9000):,} people signed a petition.",
         f"Construction will begin in {pick(MONTHS)}, and some streets will be closed during the work.",
         f"A similar plan in {pick(CITIES)} reduced {pick(['traffic', 'air pollution', 'noise', 'accidents'])} by {num(5, 40)} percent.",
         "Local businesses are divided: some expect more customers, others fear months of disruption.",
         f"The council will review the plan again on {date()}."]
    return " ".join(s[:1] + R.sample(s[1:], num(3, 7)))


def doc_science() -> str:
    uni = pick(["the University of " + pick(CITIES), pick(CITIES) + " Institute of Technology", "a team at " + pick(COMPANIES)])
    thing = pick(["drinking coffee", "daily walking", "screen time before bed", "a Mediterranean diet",
                  "learning a second language", "working night shifts", "owning a dog", "intermittent fasting",
                  "listening to music while studying", "urban air pollution"])
    out = pick(["heart disease", "memory decline", "sleep quality", "depression", "blood pressure",
                "exam scores", "longevity", "type 2 diabetes"])
    s = [f"Researchers at {uni} studied {num(200, 50000):,} participants over {num(2, 20)} years to understand how {thing} affects {out}.",
         f"They found that people who reported more {thing} had a {num(5, 45)} percent {pick(['lower', 'higher'])} risk of {out}.",
         f"The effect held even after adjusting for age, income and {pick(['smoking', 'exercise', 'diet', 'education'])}.",
         f"Lead author {person()} cautioned that the study was observational and cannot prove causation.",
         f"The results were published in the journal {pick(['Nature Medicine', 'The Lancet', 'PLOS One', 'Science Advances', 'BMJ'])} on {date()}.",
         "Earlier experiments in mice had suggested a similar link.",
         f"The team now plans a randomized trial with {num(100, 3000)} volunteers.",
         f"Independent experts called the findings {pick(['promising', 'interesting but preliminary', 'surprising', 'consistent with earlier work'])}.",
         f"Funding came from {pick(COMPANIES)} and a national research council."]
    return " ".join(s[:1] + R.sample(s[1:], num(3, 7)))


def doc_sports() -> str:
    a, b = R.sample(CITIES, 2)
    ga, gb = num(0, 5), num(0, 5)
    s = [f"{a} {pick(['United', 'FC', 'Rovers', 'Tigers', 'City'])} {pick(['beat', 'edged', 'drew with', 'lost to'])} {b} {ga}-{gb} on {pick(WEEKDAYS)} night in front of {num(8000, 80000):,} fans.",
         f"{person()} opened the scoring in the {num(2, 45)}th minute with a {pick(['header', 'free kick', 'long-range shot', 'penalty'])}.",
         f"The visitors equalized just after halftime through {person()}.",
         f"Coach {person()} said afterwards that he was {pick(['proud of the effort', 'frustrated with the referee', 'worried about injuries', 'happy with the point'])}.",
         f"The result leaves {a} in {pick(['first', 'third', 'fifth', 'last'])} place with {num(10, 60)} points.",
         f"Goalkeeper {person()} made {num(3, 11)} saves, including a stunning stop in stoppage time.",
         f"The next match is against {pick(CITIES)} on {date()}."]
    return " ".join(s[:1] + R.sample(s[1:], num(2, 5)))


def doc_email() -> str:
    sender, to = person(), pick(FIRST)
    s = [f"We need to move the {pick(['quarterly review', 'product demo', 'team lunch', 'client call', 'training session', 'budget meeting'])} to {pick(WEEKDAYS)}, {date()} at {num(8, 17)}:{pick(['00', '15', '30', '45'])}.",
         f"Please send me your {pick(['slides', 'expense reports', 'updated estimates', 'feedback', 'availability'])} by {pick(WEEKDAYS)}.",
         f"The location is {pick(['room 4B', 'the main conference room', 'our ' + pick(CITIES) + ' office', 'Zoom (link below)'])}.",
         f"{person()} will join us from {pick(COMPANIES)} to present the {pick(['new pricing', 'security audit', 'roadmap', 'survey results'])}.",
         f"The budget for this is {money()}, so please keep travel costs low.",
         f"If you have questions, contact {email_addr(sender)} or call {phone()}.",
         f"Also, a reminder that the office will be closed on {date()} for maintenance.",
         "Don't forget to submit your timesheets before the end of the month."]
    body = " ".join(R.sample(s, num(3, 6)))
    return f"{pick(['Hi', 'Hello', 'Dear', 'Hey'])} {to},\n\n{body}\n\n{pick(['Best', 'Thanks', 'Cheers', 'Regards', 'Kind regards'])},\n{sender}"


def doc_meeting() -> str:
    names = [pick(FIRST) for _ in range(4)]
    items = [f"- {pick(['Migration to the new CRM', 'Website redesign', 'Hiring for the data team', 'Q3 marketing campaign', 'Office move', 'Security audit', 'Mobile app release'])} is {num(10, 95)}% done (owner: {pick(names)}).",
             f"- {pick(names)} reported that {pick(['checkout errors', 'support tickets', 'page load times', 'refund requests'])} {pick(['doubled', 'dropped by half', 'spiked'])} last week.",
             f"- Decision: {pick(['postpone the launch', 'hire a contractor', 'switch vendors', 'freeze spending'])} until {date()}.",
             f"- Action item: {pick(names)} to {pick(['draft the customer email', 'update the forecast', 'book the venue', 'review the contract'])} by {pick(WEEKDAYS)}.",
             f"- Budget approved: {money()} for {pick(['tools', 'travel', 'ads', 'training'])}.",
             f"- Open question: {pick(['do we need legal review?', 'who owns onboarding?', 'should we drop the old API?', 'is the deadline realistic?'])}",
             f"- Next meeting: {date()}."]
    return f"Meeting notes - {pick(['Product', 'Marketing', 'Engineering', 'Finance', 'Ops'])} - {date()}\nAttendees: {', '.join(names)}\n" + "\n".join(R.sample(items, num(3, 7)))


def doc_story() -> str:
    hero, place = pick(FIRST), pick(["the old harbor", "a mountain village", "the abandoned mall", "a space station",
                                      "her grandmother's farm", "the night market", "a lighthouse", "the desert outpost"])
    s = [f"{hero} arrived at {place} just as the {pick(['rain', 'snow', 'sun', 'fog'])} {pick(['started', 'cleared', 'thickened'])}.",
         f"Nobody had lived there for {num(3, 90)} years, or so the stories said.",
         f"In {pick(['her', 'his', 'their'])} pocket was a {pick(['letter', 'key', 'photograph', 'map'])} that had arrived with no return address.",
         f"A {pick(['dog', 'stranger', 'child', 'crow'])} watched from the {pick(['doorway', 'roof', 'fence', 'window'])}, unmoving.",
         f"\"You're late,\" said a voice behind {pick(['her', 'him', 'them'])}.",
         f"{hero} turned, but there was only the {pick(['wind', 'sea', 'empty street', 'hum of the machines'])}.",
         f"By midnight the {pick(['lights', 'bells', 'radios', 'engines'])} had started again, one after another.",
         f"It was then that {hero} understood why {pick(['the letter', 'the key', 'the map'])} had been sent.",
         f"{pick(['She', 'He', 'They'])} sat down on the steps and waited for morning."]
    return " ".join(s[:1] + R.sample(s[1:], num(3, 7)))


def doc_chatlog() -> str:
    ppl = [pick(FIRST).lower() for _ in range(3)]
    lines = [f"anyone else seeing {pick(['timeouts', '500 errors', 'slow builds', 'login failures'])} on {pick(['staging', 'prod', 'the VPN', 'CI'])}?",
             "yep since this morning", f"my bad, I {pick(['pushed a config change', 'restarted the db', 'rotated the keys'])}",
             "should be fixed now", f"reminder: {pick(['demo', 'standup', 'retro', 'all-hands'])} at {num(1, 5)}pm",
             f"can someone review my PR #{num(100, 999)}?", "on it", "lunch anyone?", f"I'll be out {pick(WEEKDAYS)}",
             f"customer {pick(COMPANIES)} is asking about the {pick(['invoice', 'outage', 'renewal', 'SLA'])}", "thanks!"]
    return "\n".join(f"[{num(8, 18):02d}:{num(0, 59):02d}] {pick(ppl)}: {line}" for line in R.sample(lines, num(4, 9)))


def doc_abstract() -> str:
    s = [f"We propose {pick(['a novel', 'a lightweight', 'a scalable', 'an efficient'])} method for {pick(['image segmentation', 'protein folding prediction', 'speech recognition in noisy environments', 'traffic forecasting', 'detecting fraud in payments', 'machine translation of low-resource languages'])}.",
         f"Our approach combines {pick(['graph neural networks', 'contrastive learning', 'Bayesian optimization', 'sparse attention', 'reinforcement learning'])} with {pick(['data augmentation', 'knowledge distillation', 'a physics-based prior', 'active learning'])}.",
         f"On {num(2, 6)} benchmark datasets it improves accuracy by {num(1, 15)}.{num(0, 9)} points over the previous state of the art.",
         f"Training cost is reduced by {num(10, 70)}%, making the method practical on a single GPU.",
         f"Ablation studies show that the {pick(['augmentation', 'prior', 'attention pattern', 'loss function'])} is the key ingredient.",
         "We release our code and pretrained models to support future research.",
         f"Limitations include {pick(['sensitivity to hyperparameters', 'poor performance on very small datasets', 'high memory usage'])}."]
    return " ".join(s[:2] + R.sample(s[2:], num(2, 5)))


def doc_policy() -> str:
    s = [f"Employees may {pick(['work remotely', 'take unpaid leave', 'use company vehicles', 'expense meals'])} {pick(['up to two days per week', 'with prior approval', 'only for business purposes', 'after six months of service'])}.",
         f"Requests must be submitted through the {pick(['HR portal', 'intranet', 'travel system'])} at least {num(2, 30)} days in advance.",
         f"Reimbursement is limited to {money()} per {pick(['month', 'trip', 'year'])} and requires an itemized receipt.",
         f"Company equipment must be returned within {num(5, 30)} days of termination.",
         "Violations may result in disciplinary action, up to and including dismissal.",
         f"This policy takes effect on {date()} and replaces all previous versions.",
         "Managers are responsible for ensuring their teams comply with this policy.",
         f"Questions should be directed to {email_addr(person())}."]
    return " ".join(R.sample(s, num(3, 7)))


def doc_ticket() -> str:
    p = person()
    s = [f"I was charged {money()} twice for my {pick(['subscription', 'order', 'annual plan', 'delivery'])} on {date()}.",
         f"My order #{num(10000, 99999)} still hasn't arrived and the tracking hasn't updated in {num(3, 20)} days.",
         f"The app keeps {pick(['crashing when I open settings', 'logging me out', 'showing a blank screen', 'freezing on startup'])} on my {pick(['iPhone', 'Android phone', 'laptop', 'tablet'])}.",
         "I can't reset my password, the email never comes.",
         f"My account email is {email_addr(p)}.",
         f"Please {pick(['refund me', 'fix this', 'call me back', 'cancel my account'])} as soon as possible.",
         f"This is the {pick(['second', 'third', 'fourth'])} time I'm writing about this.",
         f"You can reach me at {phone()}."]
    return f"Subject: {pick(['Problem with my order', 'URGENT', 'Billing issue', 'App not working', 'Help please'])}\n\n" + " ".join(R.sample(s, num(3, 6))) + f"\n\n{p}"


def doc_bio() -> str:
    p, city = person(), pick(CITIES)
    job = pick(["architect", "jazz pianist", "marine biologist", "novelist", "chef", "civil rights lawyer",
                "mountaineer", "software engineer", "painter", "economist"])
    s = [f"{p} (born {num(1930, 1995)} in {city}) is a {job} known for {pick(['her', 'his', 'their'])} work on {pick(['public housing', 'coral reefs', 'minimalist design', 'crime fiction', 'fermentation', 'voting rights', 'open-source tools'])}.",
         f"After studying at the University of {pick(CITIES)}, {p.split()[0]} moved to {pick(CITIES)} in {num(1960, 2015)}.",
         f"{pick(['Her', 'His', 'Their'])} breakthrough came in {num(1970, 2020)} with {pick(['a widely praised exhibition', 'a best-selling book', 'an award-winning project', 'a landmark court case'])}.",
         f"{p.split()[0]} has received {num(2, 15)} international awards, including the {pick(['Golden Compass Prize', 'Laurel Medal', 'Northern Star Award'])}.",
         f"Today {p.split()[0]} lives in {pick(CITIES)} and teaches part-time.",
         f"Critics have described {pick(['her', 'his', 'their'])} style as {pick(['bold', 'quietly radical', 'playful', 'uncompromising'])}."]
    return " ".join(s[:1] + R.sample(s[1:], num(2, 5)))


def doc_travel() -> str:
    city = pick(CITIES)
    s = [f"We spent {num(2, 14)} days in {city} {pick(['last spring', 'in August', 'over New Year', 'in the rainy season'])}.",
         f"The highlight was {pick(['a sunrise hike', 'the food market', 'a boat trip along the coast', 'the old cathedral', 'a cooking class'])}.",
         f"Our hotel cost {money()} per night and was {pick(['a bit noisy', 'perfectly located', 'tiny but clean', 'far from everything'])}.",
         f"Public transport was {pick(['cheap and easy', 'confusing at first', 'crowded but reliable'])}.",
         f"If you go, {pick(['book museums in advance', 'bring an umbrella', 'try the street food', 'learn a few words of the language'])}.",
         f"We'd love to go back to {city} someday."]
    return " ".join(s[:1] + R.sample(s[1:], num(2, 5)))


def doc_job() -> str:
    s = [f"{pick(COMPANIES)} is hiring a {pick(['Senior', 'Junior', 'Lead', ''])} {pick(['Data Analyst', 'Backend Engineer', 'Product Designer', 'Marketing Manager', 'Nurse', 'Accountant', 'Sales Representative'])} in {pick(CITIES)} ({pick(['remote', 'hybrid', 'on-site'])}).",
         f"Salary range: {money()} - {money()} per year.",
         f"Requirements: {num(1, 8)}+ years of experience, {pick(['SQL and Python', 'Figma', 'B2B sales', 'a nursing license', 'CPA certification'])}, and strong communication skills.",
         f"Benefits include {pick(['health insurance', 'a four-day week', 'stock options', 'a learning budget'])} and {num(20, 35)} days of paid leave.",
         f"Apply by {date()} by emailing {email_addr(person())}."]
    return " ".join(s)


DOC_GENS: list[Callable[[], str]] = [doc_review, doc_news_business, doc_news_local, doc_science, doc_sports,
                                     doc_email, doc_meeting, doc_story, doc_chatlog, doc_abstract, doc_policy,
                                     doc_ticket, doc_bio, doc_travel, doc_job]


def doc(long: bool = False) -> str:
    if not long:
        return pick(DOC_GENS)()
    # Long pasted documents: several generated pieces, 1.5k-9k characters.
    parts, target = [], num(1500, 5000)
    while sum(map(len, parts)) < target:
        parts.append(pick(DOC_GENS)())
    return "\n\n".join(parts)


# Documents in other languages: summarizing or extracting from them must not look like translation.
FOREIGN_DOC_SENTS: dict[str, list[str]] = {
    "French": ["Le conseil municipal de {city} a approuvé mardi un budget de {n} millions d'euros pour rénover les écoles.",
               "Selon la maire, {p}, les travaux commenceront en septembre et dureront environ {k} ans.",
               "Les habitants ont exprimé leur inquiétude concernant le bruit et la circulation.",
               "L'entreprise {co} a annoncé une hausse de {k} % de son chiffre d'affaires au dernier trimestre.",
               "J'ai acheté cet appareil il y a deux semaines et il ne fonctionne déjà plus, je suis très déçu.",
               "La réunion de lundi est reportée à jeudi à 14 heures, dans la salle B.",
               "Les chercheurs ont suivi {n} participants pendant dix ans pour mesurer l'effet du sommeil sur la mémoire.",
               "Merci de confirmer votre présence avant vendredi auprès de {p}.",
               "Le festival de musique attire chaque été plus de {n} 000 visiteurs dans la région.",
               "Le gouvernement prévoit de réduire les émissions de carbone de {k} % d'ici 2035."],
    "Spanish": ["El ayuntamiento de {city} aprobó el martes un presupuesto de {n} millones de euros para el transporte público.",
                "Según el alcalde, {p}, las obras empezarán en marzo y durarán unos {k} años.",
                "Muchos vecinos se quejaron del ruido y de la falta de aparcamiento.",
                "La empresa {co} anunció que sus ventas crecieron un {k} % en el último año.",
                "Compré estos auriculares hace un mes y la batería ya casi no dura, no los recomiendo.",
                "La reunión del lunes se traslada al jueves a las diez de la mañana.",
                "Un estudio con {n} personas encontró que caminar a diario reduce el estrés.",
                "Por favor, enviad vuestros informes antes del viernes a {p}.",
                "El equipo local ganó {k} a 1 y se clasificó para la final del torneo.",
                "Las lluvias de esta semana provocaron inundaciones en varios pueblos del norte."],
    "German": ["Der Stadtrat von {city} hat am Dienstag ein Budget von {n} Millionen Euro für neue Radwege beschlossen.",
               "Laut Bürgermeisterin {p} sollen die Arbeiten im Frühjahr beginnen und etwa {k} Jahre dauern.",
               "Viele Anwohner befürchten mehr Lärm und weniger Parkplätze.",
               "Das Unternehmen {co} meldete für das dritte Quartal ein Umsatzplus von {k} Prozent.",
               "Ich habe den Staubsauger vor zwei Wochen gekauft und er ist schon kaputt, sehr enttäuschend.",
               "Das Meeting am Montag wird auf Donnerstag, 15 Uhr, verschoben.",
               "Forscher haben {n} Teilnehmer über zehn Jahre begleitet, um den Einfluss von Sport auf das Gedächtnis zu untersuchen.",
               "Bitte schicken Sie mir die Unterlagen bis Freitag, Ihr {p}.",
               "Der Zugverkehr zwischen Hamburg und Berlin war wegen eines Sturms stundenlang unterbrochen.",
               "Die Regierung will bis 2030 {k} Prozent des Stroms aus erneuerbaren Energien gewinnen."],
    "Italian": ["Il consiglio comunale di {city} ha approvato martedì un bilancio di {n} milioni di euro per le scuole.",
                "Secondo il sindaco {p}, i lavori inizieranno a giugno e dureranno circa {k} anni.",
                "Molti residenti si sono lamentati del traffico e del rumore.",
                "L'azienda {co} ha registrato un aumento del fatturato del {k} per cento.",
                "Ho comprato questa macchina del caffè un mese fa e funziona benissimo, la consiglio.",
                "La riunione di lunedì è stata spostata a giovedì alle 11.",
                "Uno studio su {n} persone mostra che la dieta mediterranea protegge il cuore.",
                "Vi prego di confermare la vostra presenza entro venerdì."],
    "Portuguese": ["A câmara municipal de {city} aprovou na terça-feira um orçamento de {n} milhões de euros para habitação.",
                   "Segundo o presidente da câmara, {p}, as obras vão começar em abril e durar cerca de {k} anos.",
                   "Muitos moradores reclamaram do barulho e do trânsito.",
                   "A empresa {co} anunciou um crescimento de {k} % nas vendas deste ano.",
                   "Comprei este telemóvel há duas semanas e a bateria é excelente, recomendo.",
                   "A reunião de segunda-feira foi adiada para quinta às 15 horas.",
                   "Um estudo com {n} participantes mostrou que dormir pouco afeta a memória.",
                   "Por favor, enviem os relatórios até sexta-feira."],
    "Japanese": ["{city}市議会は火曜日、学校の改修に{n}億円の予算を承認した。", "工事は来年の春に始まり、約{k}年かかる見込みだ。",
                 "住民の多くは騒音と交通渋滞を心配している。", "{co}は第3四半期の売上高が{k}%増加したと発表した。",
                 "月曜日の会議は木曜日の午後3時に変更になりました。", "このイヤホンは音質が良いが、バッテリーの持ちが悪い。"],
    "Chinese": ["{city}市议会周二批准了{n}亿元的学校翻新预算。", "工程预计明年春天开始，持续大约{k}年。",
                "许多居民担心噪音和交通问题。", "{co}公司宣布第三季度营收增长了{k}%。",
                "周一的会议改到周四下午三点。", "这款耳机音质很好，但是电池续航太短。"],
    "Russian": ["Городской совет {city} во вторник утвердил бюджет в {n} миллионов рублей на ремонт школ.",
                "По словам мэра, работы начнутся весной и продлятся около {k} лет.",
                "Многие жители жалуются на шум и пробки.", "Компания {co} сообщила о росте выручки на {k} процентов.",
                "Совещание в понедельник перенесено на четверг, 15:00."],
}


def foreign_doc(lang: str | None = None) -> tuple[str, str]:
    lang = lang or pick(list(FOREIGN_DOC_SENTS))
    sents = R.sample(FOREIGN_DOC_SENTS[lang], min(len(FOREIGN_DOC_SENTS[lang]), num(3, 7)))
    sep = "" if lang in ("Japanese", "Chinese") else " "
    text = sep.join(sents).format(city=pick(CITIES), n=num(2, 900), k=num(2, 40), p=person(), co=pick(COMPANIES))
    return lang, text


def wrap_doc(text: str, instr: str) -> str:
    """Place an instruction before, after or around a pasted document, with varied delimiters."""
    style = R.randrange(9)
    if style == 0:
        return f"{instr}\n\n{text}"
    if style == 1:
        return f"{instr}:\n{text}"
    if style == 2:
        return f"{text}\n\n{instr}"
    if style == 3:
        return f"{instr}\n\n\"\"\"\n{text}\n\"\"\""
    if style == 4:
        return f"Text:\n{text}\n\nTask: {instr}"
    if style == 5:
        return f"{text}\n---\n{instr}"
    if style == 6:
        return f"{instr} {text}"
    if style == 7:
        return f"{instr}\n```\n{text}\n```"
    return f"Here is the text:\n{text}\n\n{instr}"


# ---------------------------------------------------------------- summarization
SUM_INSTR = [
    "Summarize this", "Summarize the following text", "summarize", "Summarise this article", "tl;dr",
    "TL;DR please", "Give me a summary", "Can you summarize this for me?", "Write a short summary of this",
    "Summarize in {n} sentences", "Summarize in {n} bullet points", "Give me the key points", "What's the gist?",
    "Condense this into a paragraph", "Boil this down to {n} bullets", "Give me a one-sentence summary",
    "Recap this", "Provide a brief summary", "Shorten this to under {w} words", "Summarize the main points",
    "Write an executive summary of the above", "Summarize for a busy executive", "What are the main takeaways?",
    "Give me the short version", "Make this shorter, keeping only the essentials", "Key takeaways?",
    "Summarize the above text", "Summarize this email", "Summarize these notes", "Summarize this review",
    "Summarize this thread", "Summarize this conversation", "Summarize the article below",
    "Create a summary suitable for a newsletter", "Write a synopsis", "Give me a quick recap of this",
    "Sum this up", "sum up the text", "summary please", "Summarize it like I'm five", "In a nutshell?",
    "Write a {n}-line summary", "Highlight the most important points", "Could you give me an overview of this text?",
    "I don't have time to read this, what does it say?", "Outline the main ideas of this passage",
    "Reduce this to its core message", "Summarize the key decisions", "Give me bullet-point highlights",
    "Summarize this for my team", "Abstract this into two lines", "Paraphrase this as a short summary",
    "Please provide a concise summary of the following", "Write a short recap for someone who missed it",
    "What is this text about? Keep it brief", "Summarize this report", "Summarize the story so far",
    "Digest this into a short paragraph", "Give me the CliffsNotes version", "Summarize without losing key numbers",
    "Résume ce texte", "Resume este texto", "Fasse diesen Text zusammen", "Riassumi questo testo",
    "Resuma este texto", "Vat dit samen", "要約してください", "请总结一下这段文字", "Кратко перескажи этот текст",
    "Fais un résumé en trois points", "Haz un resumen breve", "Kurze Zusammenfassung bitte",
]


SUM_INSTR += [
    "Give me the highlights", "Main points please", "List the main points",
    "What are the key ideas here?", "Distill the key message", "Briefly, what does this say?", "Give me an overview",
    "Cut this down to the essentials", "Give me the bullet points", "Break this down into a few key points",
    "Write a brief recap", "Recap the discussion", "Give me a quick rundown of this", "Rundown please",
    "What happened here, in short?", "Compress this into a tweet", "Make a short abstract for this",
    "Summarize the findings", "Summarize the pros and cons mentioned", "What is the main argument?",
    "Explain what this article says in a few sentences", "Sum up the key facts", "Give me the key info in brief",
    "Synthesize the main points", "Can I get a quick summary?", "Skim this for me and tell me what matters",
    "Turn this into a short status update", "Write meeting minutes summary from these notes",
    "Condense the thread below", "What did I miss?", "Brief me on this", "Shorten this text",
]
SUM_NATIVE: dict[str, list[str]] = {
    "French": ["Résume ce texte", "Fais-moi un résumé en deux phrases", "Peux-tu résumer cet article ?", "Résumé en trois points, s'il te plaît"],
    "Spanish": ["Resume este texto", "Hazme un resumen corto", "¿Puedes resumir este artículo?", "Resumen en tres puntos, por favor"],
    "German": ["Fasse diesen Text zusammen", "Fass das bitte in zwei Sätzen zusammen", "Kannst du den Artikel zusammenfassen?", "Kurze Zusammenfassung, bitte"],
    "Italian": ["Riassumi questo testo", "Fammi un breve riassunto", "Puoi riassumere l'articolo?"],
    "Portuguese": ["Resuma este texto", "Faça um resumo curto", "Pode resumir esta notícia?"],
    "Japanese": ["この文章を要約してください", "三行でまとめて", "要点をまとめてください"],
    "Chinese": ["请总结这段文字", "用一句话概括", "帮我总结一下要点"],
    "Russian": ["Кратко перескажи этот текст", "Сделай краткое резюме", "Перескажи в двух предложениях"],
}


def sum_instr() -> str:
    return pick(SUM_INSTR).format(n=num(1, 5), w=pick([20, 30, 50, 100, 150]))


def gen_summarization() -> str:
    r = R.random()
    if r < 0.62:
        return wrap_doc(doc(long=maybe(0.2)), noisy(sum_instr(), 0.3))
    if r < 0.74:
        lang, text = foreign_doc()
        instr = pick(SUM_NATIVE[lang]) if maybe(0.6) else sum_instr() + pick(["", "", " (in English)", f" - it's in {lang}"])
        return wrap_doc(text, instr)
    if r < 0.84:
        # Prose the user pasted themselves: lectures, transcripts, essays.
        speaker = person()
        t = (f"Transcript - {pick(['lecture', 'podcast', 'interview', 'webinar'])} with {speaker}\n" +
             " ".join(pick([f"So the first thing I want to say about {pick(['leadership', 'climate policy', 'marathon training', 'saving for retirement', 'learning to code', 'parenting teenagers'])} is that it's a long game.",
                            "People always ask me how I started, and honestly it was an accident.",
                            f"The data shows about {num(10, 90)} percent of people give up in the first year.",
                            "What actually works is small, boring habits repeated every day.",
                            f"In {num(1990, 2020)} I made my biggest mistake, which was trying to do everything alone.",
                            "The second point is that feedback matters more than talent.",
                            "And finally, don't compare your chapter one to someone else's chapter twenty.",
                            "Let me give you an example from my own career."]) for _ in range(num(4, 12))))
        return wrap_doc(t, noisy(sum_instr(), 0.3))
    if r < 0.90:
        return noisy(pick(["Summarize the article I pasted earlier in {n} bullets",
                           "Can you summarize the conversation we just had?",
                           "Please give me a summary of the document above",
                           "Summarize the previous message in one sentence",
                           "make a tl;dr of the text above", "Summarize the email below",
                           "Summarize what I wrote above", "recap our discussion so far",
                           "Summarize the attached transcript", "Give me the key points of the report I shared"]).format(n=num(2, 5)))
    # Several short items pasted as a list.
    items = "\n".join(f"{i + 1}. {pick([doc_review, doc_ticket, doc_travel])()}" for i in range(num(2, 5)))
    return wrap_doc(items, pick(["Summarize what these reviews say overall", "Give me a summary of the feedback",
                                 "Summarize the common themes", "Sum up these customer comments",
                                 "What do these have in common? Summarize briefly", "Summarize each item in one line"]))


# ---------------------------------------------------------------- extraction
EXT_DOC_INSTR = [
    "Extract all dates mentioned in the text", "Extract all names of people", "List every person and organization mentioned",
    "Extract the named entities (PERSON, ORG, LOC, DATE) as JSON", "Pull out all monetary amounts",
    "Return the key facts as JSON with fields: who, what, when, where", "Extract all email addresses and phone numbers",
    "Find every number in the text and say what it refers to", "Extract the action items and their owners",
    "Give me a JSON object with the company, amount, date and investors", "List the locations mentioned",
    "Extract the product name, rating and complaints as JSON", "What is the sentiment of this text?",
    "Classify the sentiment as positive, negative or neutral", "Classify this text into a topic category",
    "Is this text about sports, business, science, politics or entertainment?", "Extract the key-value pairs",
    "Extract all dates and convert them to ISO format", "Create a table of names and roles from this text",
    "Extract structured data: sender, recipient, date, requested action", "Tag all entities in this text",
    "Pull the deadlines out of this", "Find all the organizations mentioned and return them as a list",
    "Extract the percentages and what they describe", "Identify the main entities and their relationships",
    "Return a JSON array of all people mentioned with their job titles", "Detect the language of this text",
    "Classify the urgency of this message: low, medium or high", "What category does this document belong to?",
    "Extract every time and date into a list", "Output the fields title, author, date in JSON",
    "Extract the order numbers and amounts", "List all the quantities with their units",
    "Identify any personally identifiable information in this text", "Extract the decisions made, as a list",
    "Label this document as complaint, inquiry, praise or other", "Parse this into JSON",
    "Extract the addresses from this", "Find the companies and the amounts associated with each",
    "Which emotions are expressed here? Give labels only", "Fill in this schema from the text: {name, date, place, amount}",
    "Extraia as datas e os nomes deste texto", "Extrae las entidades nombradas de este texto",
    "Extrahiere alle Namen und Daten aus diesem Text als JSON", "Extrais toutes les dates de ce texte",
    "この文章から人名と日付を抽出してください", "从这段文字中提取所有人名和日期",
]

SENT_INSTR = ["What's the sentiment of this review?", "Classify the sentiment (positive/negative/neutral):",
              "Is this review positive or negative?", "Sentiment analysis:", "Label the sentiment of the following:",
              "Rate the sentiment from 1 to 5:", "Tell me if this customer is happy or not:",
              "Classify this review as positive, negative or mixed.", "Positive or negative?",
              "What is the tone of this feedback?", "Detect the sentiment and return JSON {\"sentiment\": ...}:",
              "Determine whether the following tweet is positive, negative or neutral:",
              "Give a sentiment score between -1 and 1 for:", "sentiment?", "Does the reviewer like the product?"]
TWEETS = ["just missed my bus by 10 seconds, perfect start to the day", "this new album is absolutely incredible",
          "my flight got delayed 6 hours and nobody tells us anything", "finally finished my first marathon!!!",
          "the coffee at this place is fine I guess", "worst customer service ever, on hold for 2 hours",
          "can't stop smiling today", "meh, the sequel was okay", "the update broke everything, thanks a lot",
          "new job, new city, let's go", "it's raining again", "love how the staff remembered my name",
          "the package arrived crushed and wet", "honestly didn't expect much but it was great",
          "traffic is insane today", "my phone screen cracked on day one"]
INTENTS = [("I want to cancel my subscription", "cancel"), ("where is my package", "order_status"),
           ("can I pay with PayPal?", "payment_methods"), ("my card was declined", "payment_issue"),
           ("I'd like to talk to a human", "escalate"), ("how do I change my password", "account"),
           ("book a table for two at 7pm", "reservation"), ("what time do you open on Sunday", "hours"),
           ("I got the wrong size, can I exchange it", "return"), ("play some jazz", "play_music"),
           ("set an alarm for 6am", "set_alarm"), ("what's the weather tomorrow", "weather"),
           ("transfer 50 dollars to my savings", "transfer"), ("I never received my refund", "refund")]
SPAM = ["Congratulations! You've won a free iPhone, click here to claim now", "URGENT: your account will be suspended, verify your password at this link",
        "Hot singles in your area want to meet you", "Earn $5000 a week working from home, no experience needed",
        "Your package could not be delivered, pay the $1.99 fee here", "Limited offer!!! 90% off luxury watches",
        "Dear beneficiary, you have inherited 4.5 million dollars", "You have been pre-approved for a loan, reply YES"]
HAM = ["Hey, are we still on for lunch tomorrow?", "Your order #48213 has shipped and will arrive Thursday.",
       "Reminder: dentist appointment on Friday at 10am", "Can you send me the slides from today's meeting?",
       "Mom says dinner is at 7", "Your monthly statement is now available in online banking.",
       "Thanks for the feedback on my draft, I'll update it tonight"]
HEADLINES = ["Central bank raises interest rates for the third time this year", "Local team wins championship after 40-year drought",
             "New study links ultra-processed food to heart disease", "Tech giant unveils foldable laptop",
             "Parliament votes to lower the voting age to 16", "Star actor announces retirement from film",
             "Astronomers spot water vapour on distant exoplanet", "Oil prices tumble as demand weakens",
             "Striker signs record transfer deal", "Government announces new tax on sugary drinks",
             "Streaming service cancels hit show after two seasons", "Startup raises $40m to build battery recycling plants"]


EXT_NATIVE: dict[str, list[str]] = {
    "French": ["Extrais les noms, les dates et les montants", "Ce texte est-il positif ou négatif ?", "Liste toutes les entreprises mentionnées"],
    "Spanish": ["Extrae las fechas y los nombres", "¿Esta reseña es positiva o negativa?", "Saca las cantidades en formato JSON"],
    "German": ["Extrahiere alle Namen und Zahlen", "Ist diese Bewertung positiv oder negativ?", "Gib die Daten als JSON zurück"],
    "Italian": ["Estrai i nomi e le date", "Questa recensione è positiva o negativa?"],
    "Portuguese": ["Extraia as datas e os valores", "Esta avaliação é positiva ou negativa?"],
    "Japanese": ["人名と日付を抽出してください", "この文の感情はポジティブですか、ネガティブですか？"],
    "Chinese": ["提取文中的人名和日期", "判断这段评论是正面还是负面"],
    "Russian": ["Извлеки все имена и даты", "Это положительный или отрицательный отзыв?"],
}


def short_entity_sentence() -> str:
    return pick([f"{person()} flew from {pick(CITIES)} to {pick(CITIES)} on {date()} to meet {person()} of {pick(COMPANIES)}.",
                 f"{pick(COMPANIES)} agreed to pay {money()} to {pick(COMPANIES)} by {date()}.",
                 f"Contact {person()} at {email_addr(person())} or {phone()} before {pick(WEEKDAYS)}.",
                 f"Invoice #{num(1000, 9999)} for {money()} was issued on {date()} to {pick(COMPANIES)}, {pick(CITIES)}.",
                 f"{person()}, {num(22, 70)}, was appointed CFO of {pick(COMPANIES)} on {date()}.",
                 f"Ship to: {person()}, {num(1, 999)} {pick(['Oak', 'Maple', 'High', 'King', 'Station'])} {pick(['Street', 'Road', 'Avenue', 'Lane'])}, {pick(CITIES)} {num(10000, 99999)}.",
                 f"Meeting with {person()} and {person()} at {num(1, 12)}:{pick(['00', '30'])} {pick(['am', 'pm'])} on {pick(WEEKDAYS)} in {pick(CITIES)}."])


EXT_SHORT_INSTR = ["Extract the entities from this sentence:", "Extract name, date and location as JSON:",
                   "Pull out the people, places and dates:", "Parse this into structured fields:",
                   "NER:", "Find the email and phone number in:", "What dates are mentioned here?",
                   "Extract the amount and the due date:", "Identify the person and the company:",
                   "Convert to JSON with keys name, address, city, zip:", "List all proper nouns in:",
                   "Extract every organization name:", "Get the key fields out of this:"]


def gen_extraction() -> str:
    r = R.random()
    if r < 0.34:
        return wrap_doc(doc(long=maybe(0.2)), noisy(pick(EXT_DOC_INSTR), 0.3))
    if r < 0.42:
        lang, text = foreign_doc()
        instr = pick(EXT_NATIVE[lang]) if lang in EXT_NATIVE and maybe(0.5) else pick(EXT_DOC_INSTR)
        return wrap_doc(text, instr)
    if r < 0.55:
        t = pick([doc_review(), pick(TWEETS), pick(TWEETS) + " " + pick(["😡", "🙂", "😂", "", "#fail", "#blessed"])])
        return noisy(pick([f"{pick(SENT_INSTR)} {t}", f"{pick(SENT_INSTR)}\n\"{t}\"", f"\"{t}\"\n\n{pick(SENT_INSTR)}"]), 0.25)
    if r < 0.63:
        u, _ = pick(INTENTS)
        labels = ", ".join(R.sample([i for _, i in INTENTS], 5))
        return pick([f"Classify the intent of this user message: \"{u}\". Options: {labels}.",
                     f"What is the user's intent? \"{u}\"", f"Intent detection. Labels: {labels}\nUtterance: {u}",
                     f"Which intent does '{u}' map to?", f"Label this query with one intent from [{labels}]: {u}"])
    if r < 0.70:
        msg = pick(SPAM + HAM)
        return pick([f"Is this message spam? \"{msg}\"", f"Spam or ham: {msg}", f"Classify as spam/not spam:\n{msg}",
                     f"Is this a phishing email? {msg}", f"Does this look like a scam? '{msg}'",
                     f"Flag this email as spam or legitimate: {msg}"])
    if r < 0.77:
        hs = R.sample(HEADLINES, num(1, 5))
        cats = pick(["politics, sports, business, science, entertainment", "World, Sports, Business, Sci/Tech", "economy / sport / health / tech / culture"])
        body = "\n".join(f"- {h}" for h in hs)
        return pick([f"Categorize these headlines into {cats}:\n{body}", f"Assign a topic ({cats}) to each headline:\n{body}",
                     f"What category is this news headline? {hs[0]}", f"Topic classification: \"{hs[0]}\""])
    if r < 0.90:
        return noisy(f"{pick(EXT_SHORT_INSTR)} {short_entity_sentence()}", 0.2)
    # Assorted labelling tasks on given text.
    s = pick(TWEETS + HAM + [doc_review()[:160]])
    return pick([f"Tag the parts of speech in: '{s}'", f"Which emotion does this express (joy, anger, sadness, fear)? {s}",
                 f"Is this comment toxic? \"{s}\"", f"Detect the language: {pick(FOREIGN)[1]}",
                 f"Classify this sentence as a question, statement or command: {s}",
                 f"Extract the keywords from: {s}", f"Label each word with its entity type: {short_entity_sentence()}",
                 f"Is this statement sarcastic? \"{s}\"", f"Give this support message a priority label: {s}",
                 f"Parse this log line into JSON: ts={num(2019, 2025)}-0{num(1, 9)}-1{num(0, 9)}T0{num(0, 9)}:{num(10, 59)}:00Z level={pick(['info', 'warn', 'error'])} user={pick(FIRST).lower()} action={pick(['login', 'upload', 'delete'])} ms={num(5, 4000)}",
                 f"Extract the hashtags and mentions: {s} #{pick(['monday', 'tech', 'food', 'travel'])} @{pick(FIRST).lower()}"])


# ---------------------------------------------------------------- translation
LANGS = ["French", "Spanish", "German", "Italian", "Portuguese", "Japanese", "Chinese", "Mandarin", "Korean",
         "Russian", "Arabic", "Hindi", "Dutch", "Swedish", "Polish", "Turkish", "Greek", "Vietnamese", "Thai",
         "Indonesian", "Czech", "Hebrew", "Ukrainian", "Norwegian", "Danish", "Finnish", "Romanian",
         "Hungarian", "Bengali", "Swahili", "Tagalog", "Persian", "Catalan", "Latin", "Brazilian Portuguese",
         "Mexican Spanish", "Cantonese", "Urdu", "Malay", "Irish"]
EN_SENTS = [
    "Where is the nearest subway station?", "I would like to book a room for two nights.",
    "The meeting has been postponed until next Tuesday.", "Could you please speak more slowly?",
    "My luggage didn't arrive with my flight.", "We are proud to announce the opening of our new store.",
    "Thank you for your order, it will ship within two business days.", "I'm sorry, I don't understand.",
    "How much does this cost?", "Happy birthday! I hope all your wishes come true.",
    "Please keep your seatbelt fastened while seated.", "The museum is closed on Mondays.",
    "Can I have the check, please?", "I have an appointment with Dr. Weber at three o'clock.",
    "The children are playing in the garden.", "Our team will contact you within 24 hours.",
    "Do you have any vegetarian dishes?", "I've been learning to play the guitar for two years.",
    "Warning: this product contains nuts.", "She forgot her umbrella at the restaurant.",
    "All employees must complete the safety training by Friday.", "It was a pleasure working with you.",
    "The train to the airport leaves every fifteen minutes.", "I lost my wallet, can you help me?",
    "Please find attached the signed contract.", "The weather will be sunny with a light breeze.",
    "We look forward to welcoming you.", "Turn left at the second traffic light.",
    "I'm allergic to shellfish.", "Our office is on the fourth floor.", "Is breakfast included?",
    "Congratulations on your new job!", "Please do not disturb.", "The password must contain at least eight characters.",
    "Your subscription will renew automatically next month.", "He has lived in this village all his life.",
    "Could you recommend a good local restaurant?", "The concert was cancelled due to the storm.",
    "I love you more than words can say.", "Wash your hands before eating.", "Good morning, how did you sleep?",
    "Click the button below to reset your password.", "The library closes at eight in the evening.",
    "We need more time to finish the project.", "This medicine should be taken twice a day after meals.",
    "The view from the top of the hill is breathtaking.", "Let's meet in front of the cinema at seven.",
    "Free shipping on all orders over fifty dollars.", "My grandmother makes the best apple pie.",
]
FOREIGN = [  # (language, sentence)
    ("French", "Je voudrais réserver une table pour quatre personnes ce soir."), ("French", "Il fait beau aujourd'hui, on va à la plage ?"),
    ("French", "Nous avons bien reçu votre dossier et nous vous répondrons sous huit jours."), ("French", "Où se trouve la gare, s'il vous plaît ?"),
    ("Spanish", "¿Me puedes ayudar con las maletas?"), ("Spanish", "El tren sale a las ocho y media de la mañana."),
    ("Spanish", "Mañana no puedo ir a trabajar porque estoy enfermo."), ("Spanish", "Gracias por todo, nunca lo olvidaré."),
    ("German", "Ich habe meinen Schlüssel im Büro vergessen."), ("German", "Können Sie mir bitte die Rechnung schicken?"),
    ("German", "Das Wetter soll am Wochenende schön werden."), ("German", "Wir müssen das Projekt bis Freitag abschließen."),
    ("Italian", "Vorrei un caffè e un cornetto, per favore."), ("Italian", "Il negozio apre alle nove di mattina."),
    ("Italian", "Non ho mai visto un tramonto così bello."), ("Portuguese", "Onde fica o banheiro?"),
    ("Portuguese", "Estou muito feliz por te ver de novo."), ("Portuguese", "A reunião foi adiada para amanhã."),
    ("Japanese", "今日はとても暑いですね。"), ("Japanese", "駅はどこですか？"), ("Japanese", "このケーキはとても美味しいです。"),
    ("Japanese", "来週の会議は中止になりました。"), ("Chinese", "我明天要去上海出差。"), ("Chinese", "这家餐厅的菜很好吃。"),
    ("Chinese", "请问洗手间在哪里？"), ("Korean", "만나서 반갑습니다."), ("Korean", "이거 얼마예요?"),
    ("Russian", "Я очень люблю читать книги."), ("Russian", "Где находится ближайшая аптека?"),
    ("Russian", "Завтра будет холодно и пойдёт снег."), ("Arabic", "أين أقرب محطة حافلات؟"), ("Arabic", "شكرا جزيلا على مساعدتك."),
    ("Dutch", "Ik ga morgen met de fiets naar mijn werk."), ("Dutch", "Hoe laat vertrekt de trein?"),
    ("Swedish", "Jag förstår inte vad du menar."), ("Polish", "Dziękuję bardzo za pomoc."), ("Polish", "Gdzie jest dworzec?"),
    ("Turkish", "Bu akşam sinemaya gidelim mi?"), ("Greek", "Καλημέρα, τι κάνεις;"), ("Hindi", "मुझे हिंदी सीखना पसंद है।"),
    ("Vietnamese", "Tôi muốn gọi một ly cà phê sữa đá."), ("Indonesian", "Saya sedang belajar bahasa Indonesia."),
    ("Czech", "Kde je nejbližší restaurace?"), ("Hebrew", "אני לא מדבר עברית טוב."), ("Ukrainian", "Дякую, що прийшли."),
    ("Finnish", "Hyvää huomenta, mitä kuuluu?"), ("Latin", "Veni, vidi, vici."), ("Latin", "Carpe diem, quam minimum credula postero."),
    ("Thai", "ขอบคุณมากครับ"), ("Swahili", "Habari za asubuhi?"),
]
PHRASES = [("German", "Wie spät ist es?"), ("German", "Ich habe Hunger"), ("German", "Das ist mir egal"), ("French", "Je ne comprends pas"),
           ("French", "C'est la vie"), ("French", "Ça ne fait rien"), ("Spanish", "No pasa nada"), ("Spanish", "¿Cómo te llamas?"),
           ("Spanish", "Me da igual"), ("Italian", "Non lo so"), ("Italian", "Che bello!"), ("Portuguese", "Saudade"),
           ("Portuguese", "Tudo bem?"), ("Japanese", "いただきます"), ("Japanese", "お疲れ様です"), ("Chinese", "加油"),
           ("Korean", "화이팅"), ("Russian", "Всё хорошо"), ("Dutch", "Gezellig"), ("Swedish", "Lagom"), ("Danish", "Hygge"),
           ("Latin", "Memento mori"), ("Hindi", "Kya haal hai?"), ("Arabic", "Inshallah"), ("Turkish", "Kolay gelsin"),
           ("Greek", "Efcharistó"), ("Polish", "Na zdrowie"), ("Hebrew", "Mazel tov"), ("Finnish", "Sisu"), ("Czech", "Dobrou chuť")]
WORDS = ["butterfly", "umbrella", "cheers", "good night", "library", "friendship", "strawberry", "hospital",
         "thank you", "excuse me", "I'm lost", "beautiful", "cat", "train ticket", "left", "sorry", "welcome",
         "delicious", "happy new year", "bathroom", "water", "love", "sunflower", "bill", "nice to meet you"]
NATIVE_TRANSLATE = {  # instructions written in the source language
    "Traduis en anglais": "French", "Traduire en anglais :": "French", "Traduce al inglés:": "Spanish",
    "Tradúcelo al francés:": "Spanish", "Übersetze ins Englische:": "German", "Übersetz das bitte auf Spanisch:": "German",
    "Traduci in inglese:": "Italian", "Traduza para o inglês:": "Portuguese", "英語に翻訳してください：": "Japanese",
    "翻译成英文：": "Chinese", "翻译成日语：": "Chinese", "Переведи на английский:": "Russian", "영어로 번역해 주세요:": "Korean",
    "Vertaal naar het Engels:": "Dutch", "Przetłumacz na angielski:": "Polish", "İngilizceye çevir:": "Turkish",
}


def gen_translation() -> str:
    L, L2 = R.sample(LANGS, 2)
    r = R.random()
    if r < 0.30:
        s = pick(EN_SENTS)
        return noisy(pick([f"Translate to {L}: {s}", f"Translate into {L}: \"{s}\"", f"How do you say \"{s}\" in {L}?",
                           f"{s}\n\nTranslate this into {L}.", f"{L} translation of: {s}", f"Can you put this in {L}? {s}",
                           f"Render this in {L}: {s}", f"What's \"{s}\" in {L}?", f"translate \"{s}\" to {L.lower()}",
                           f"Please translate the following sentence into {L}, formal register: {s}",
                           f"Translate from English to {L}:\n{s}", f"EN -> {L}: {s}", f"I need this in {L}: {s}",
                           f"Give me the {L} version of: {s}", f"Translate to {L} and {L2}: {s}"]))
    if r < 0.55:
        lang, s = pick(FOREIGN)
        return noisy(pick([f"Translate to English: {s}", f"What does \"{s}\" mean?", f"What does this {lang} sentence mean? {s}",
                           f"{s}\n\nEnglish please", f"Translate this {lang} text: {s}", f"Can you translate this for me? {s}",
                           f"Translate from {lang} into {L}: {s}", f"What is this in English: {s}",
                           f"My friend sent me this: \"{s}\" - what does it say?", f"Translate: {s}",
                           f"{lang} to English: {s}", f"Help me understand this {lang} sign: {s}"]))
    if r < 0.62 and maybe(0.5):
        lang, ph = pick(PHRASES)
        return noisy(pick([f"What does '{ph}' mean?", f"What does \"{ph}\" mean in English?", f"What's the meaning of '{ph}'?",
                           f"'{ph}' - what does that mean?", f"What does {ph} mean in {lang}?", f"{ph} means what?",
                           f"My {lang} friend keeps saying '{ph}', what does it mean?", f"How would you translate '{ph}'?"]))
    if r < 0.65:
        instr = pick(list(NATIVE_TRANSLATE))
        src = [s for lang, s in FOREIGN if lang == NATIVE_TRANSLATE[instr]] or [pick(EN_SENTS)]
        return f"{instr} {pick(src)}"
    if r < 0.77:
        w = pick(WORDS)
        return noisy(pick([f"How do you say '{w}' in {L}?", f"What's the {L} word for {w}?", f"{w} in {L}?",
                           f"Translate the word '{w}' into {L}, {L2} and Italian.", f"how do u say {w} in {L.lower()}",
                           f"What is '{w}' in {L}? Include pronunciation.", f"Give me the {L} for \"{w}\""]))
    # Whole pasted documents to translate (English ones, or foreign ones into English).
    if maybe(0.3):
        lang, text = foreign_doc()
        return wrap_doc(text, noisy(pick([f"Translate this {lang} text into English", "Translate to English", "English please",
                                          f"Translate into {L}", "What does this say? Translate it", "Can you translate this?",
                                          "Traduis en anglais", "Übersetze ins Englische", "Translate this article for me"]), 0.3))
    d = doc(long=maybe(0.2))
    instr = noisy(pick([f"Translate this into {L}", f"Translate the following text to {L}", f"Please translate to {L}",
                        f"Translate this email into {L}, keeping the formatting", f"{L} translation please",
                        f"Can you translate this article into {L}?", f"Translate the text below from English to {L}",
                        f"Translate to {L}, informal tone", f"Convert this text into {L}", f"Render the above in {L}",
                        f"Translate this review into {L} for our {L} website", f"Traduce este texto al {pick(['francés', 'alemán', 'inglés'])}",
                        f"Übersetze diesen Text ins {pick(['Englische', 'Französische', 'Spanische'])}",
                        f"Traduis ce texte en {pick(['anglais', 'espagnol', 'allemand'])}"]), 0.3)
    return wrap_doc(d, instr)


# ---------------------------------------------------------------- code
PLANGS = ["Python", "JavaScript", "TypeScript", "Go", "Rust", "Java", "C", "C++", "C#", "Ruby", "PHP", "Kotlin",
          "Swift", "Scala", "Bash", "R", "Haskell", "Elixir", "Lua", "Dart", "Julia", "Perl", "Clojure", "OCaml",
          "Zig", "F#", "MATLAB", "Objective-C", "Groovy", "PowerShell", "Python 3", "Node.js", "golang"]
CODE_TASKS = [
    "reverses a linked list", "checks whether a string is a palindrome", "merges two sorted arrays",
    "parses a CSV file and sums the values in a column", "counts word frequencies in a text file",
    "finds the longest common subsequence of two strings", "implements a binary search tree with insert and delete",
    "flattens a nested list", "removes duplicates from a list while keeping order", "validates an email address",
    "converts Roman numerals to integers", "implements quicksort", "implements a thread-safe queue",
    "downloads a web page and extracts all links", "reads a JSON config file with default values",
    "computes the moving average of a stream of numbers", "generates all permutations of a string",
    "implements Dijkstra's shortest path algorithm", "rate-limits function calls with a token bucket",
    "retries an HTTP request with exponential backoff", "debounces a function", "deep-clones an object",
    "serializes a binary tree to a string and back", "detects a cycle in a directed graph",
    "resizes all images in a folder to 800px wide", "sends an email with an attachment via SMTP",
    "implements a trie for autocomplete", "parses command-line arguments", "computes the Levenshtein distance",
    "batches a list into chunks of size n", "converts a timestamp to a human-readable relative time",
    "implements an LRU cache", "runs tasks concurrently with a limit of 5 at a time",
    "reads a large file line by line without loading it into memory", "implements a simple REST API for todos",
    "connects to PostgreSQL and runs a parameterized query", "hashes passwords with bcrypt",
    "implements the game of life", "finds the k most frequent elements", "checks if two strings are anagrams",
    "validates a sudoku board", "implements a min-heap", "converts snake_case to camelCase",
    "uploads a file to S3", "tails a log file and alerts on errors", "implements pagination for an API endpoint",
    "writes unit tests for a shopping cart class", "implements FizzBuzz", "computes the nth prime",
    "implements a simple tokenizer for arithmetic expressions", "evaluates reverse Polish notation",
    "implements a pub/sub event emitter", "watches a directory for changes", "implements JWT authentication middleware",
    "scrapes a table from an HTML page", "implements matrix multiplication", "zips two lists into a dictionary",
    "groups records by a key and sums a field", "implements a circular buffer", "checks balanced parentheses",
    "computes the median of two sorted arrays", "implements a bloom filter", "renders a paginated table in React",
    "implements a websocket chat server", "memoizes an expensive function", "generates a random secure password",
]
CODE_VERBS = ["Write a {L} function that {t}", "Implement a {L} program that {t}", "Create a {L} class that {t}",
              "Can you code something in {L} that {t}?", "I need a {L} script that {t}", "{L}: write code that {t}",
              "Show me {L} code that {t}", "Give me an idiomatic {L} implementation that {t}",
              "Write a function that {t}", "write code that {t}", "Write a script that {t}, in {L}",
              "How would I write a {L} function that {t}?", "Code a {L} module that {t}, with tests",
              "Write production-quality {L} that {t}", "Help me write a {L} method that {t}",
              "Escribe una función en {L} que {t}", "Schreibe eine {L}-Funktion, die {t}", "Écris une fonction {L} qui {t}"]
SNIPPETS = [
    "def fib(n):\n    if n <= 1:\n        return n\n    return fib(n-1) + fib(n-2)\n\nprint(fib(40))",
    "for i in range(len(items)):\n    if items[i] == target:\n        items.remove(items[i])",
    "const total = cart.reduce((sum, item) => sum + item.price * item.qty);\nconsole.log(total.toFixed(2));",
    "function getUser(id) {\n  fetch('/api/users/' + id).then(r => r.json()).then(data => { return data; });\n}",
    "public int findMax(int[] arr) {\n    int max = 0;\n    for (int i = 0; i < arr.length; i++) {\n        if (arr[i] > max) max = arr[i];\n    }\n    return max;\n}",
    "char *copy(const char *s) {\n    char *d = malloc(strlen(s));\n    strcpy(d, s);\n    return d;\n}",
    "SELECT u.name, COUNT(o.id)\nFROM users u\nLEFT JOIN orders o ON o.user_id = u.id\nWHERE o.created_at > '2024-01-01'\nGROUP BY u.name;",
    "fn main() {\n    let v = vec![1, 2, 3];\n    let first = &v[0];\n    v.push(4);\n    println!(\"{}\", first);\n}",
    "func worker(jobs <-chan int, results chan<- int) {\n    for j := range jobs {\n        results <- j * 2\n    }\n}",
    "x = [[0] * 3] * 3\nx[0][0] = 1\nprint(x)",
    "async function loadAll(urls) {\n  const out = [];\n  for (const u of urls) out.push(await fetch(u));\n  return out;\n}",
    "class Counter:\n    count = []\n    def add(self, x):\n        self.count.append(x)",
    "#!/bin/bash\nfor f in $(ls *.txt); do\n  mv $f ${f%.txt}.md\ndone",
    "df = pd.read_csv('sales.csv')\ndf[df['region'] == 'EU']['revenue'] = 0\nprint(df.groupby('region').revenue.sum())",
    "const [items, setItems] = useState([]);\nuseEffect(() => {\n  fetchItems().then(setItems);\n});",
    "def add_item(item, bucket=[]):\n    bucket.append(item)\n    return bucket",
    "int main() {\n    int arr[5];\n    for (int i = 0; i <= 5; i++) arr[i] = i * i;\n    printf(\"%d\", arr[5]);\n}",
    "try:\n    value = int(user_input)\nexcept:\n    pass\nprint(value)",
    "git checkout main\ngit pull\ngit merge feature/login\ngit push origin main --force",
    "FROM python:3.12\nCOPY . /app\nRUN pip install -r /app/requirements.txt\nCMD python /app/main.py",
    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n  template:\n    spec:\n      containers:\n      - name: web\n        image: myapp:latest",
    "if (user = null) {\n  throw new Error('no user');\n}",
    "List<String> names = new ArrayList<>();\nfor (String n : names) {\n    if (n.isEmpty()) names.remove(n);\n}",
    "with open('data.txt') as f:\n    lines = f.readlines()\nwords = [l.split() for l in lines]\ncount = len(words)",
    "SELECT * FROM products WHERE name LIKE '%' + @search + '%'",
    "let result = data.map(x => { x * 2 });",
    "public static boolean isPrime(int n) {\n  for (int i = 2; i < n; i++) if (n % i == 0) return false;\n  return true;\n}",
    "def merge(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] < b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out",
    "import threading\ncounter = 0\ndef inc():\n    global counter\n    for _ in range(100000):\n        counter += 1\nts = [threading.Thread(target=inc) for _ in range(4)]\n[t.start() for t in ts]\nprint(counter)",
    "name: CI\non: push\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n      - run: npm test",
    "std::vector<int> v = {3, 1, 2};\nfor (auto it = v.begin(); it != v.end(); ++it) {\n    if (*it == 1) v.erase(it);\n}",
    "$users = mysqli_query($conn, \"SELECT * FROM users WHERE id = \" . $_GET['id']);",
    "awk '{ sum += $2 } END { print sum / NR }' data.tsv",
    "def is_even(n):\n    return n % 2 == 1",
    "<div class=\"container\">\n  <img src=\"logo.png\">\n  <p>Welcome\n</div>",
    "kubectl get pods -n prod | grep CrashLoop | awk '{print $1}' | xargs kubectl delete pod -n prod",
    "query = f\"SELECT * FROM accounts WHERE email = '{email}'\"\ncursor.execute(query)",
    "val numbers = listOf(1, 2, 3)\nnumbers.add(4)\nprintln(numbers)",
    # short snippets full of arithmetic: still code, not maths
    "def circle_area(radius):\n    return 3.14159 * radius ** 2", "int avg = sum / count;\nprintf(\"%d\", avg);",
    "mid = (lo + hi) / 2", "total = price * qty * 1.2 - discount", "double c = Math.sqrt(a * a + b * b);",
    "def celsius(f): return (f - 32) * 5 / 9", "let pct = Math.round(done / total * 100) + '%';",
    "x = 10 / 3\nprint(int(x) * 3 == 10)", "fn hyp(a: f64, b: f64) -> f64 { (a.powi(2) + b.powi(2)).sqrt() }",
    "const bmi = weight / height ^ 2;", "for i in range(1, n):\n    fact = fact * i", "y = m * x + b  # slope-intercept",
    "SELECT AVG(price * 1.0) / COUNT(*) FROM items;", "def compound(p, r, n): return p * (1 + r) ^ n",
    "volume = 4 / 3 * math.pi * r ** 3", "area = length * width\nperimeter = 2 * length + width",
    "import requests\nfor url in urls:\n    r = requests.get(url)\n    save(r.json())",
    ".box {\n  display: flex;\n  align-items: center;\n  justfy-content: center;\n}",
]
CODE_ASKS = ["Fix the bug", "What does this code do?", "Why doesn't this work?", "Explain this code line by line",
             "Can you review this code?", "Optimize this", "Refactor this to be more readable", "Add comments to this",
             "Convert this to {L}", "Write unit tests for this", "Is there a security issue here?", "Rewrite this in {L}",
             "This throws an error, help", "It returns the wrong result, why?", "How can I make this faster?",
             "Add type hints", "What's wrong with this?", "Find the bug in this code", "Port this to {L}",
             "Simplify this code", "explain what this does", "what is this doing", "why is this slow",
             "Translate this code into {L}", "Make this async", "Add error handling", "Is this idiomatic?",
             "Walk me through this snippet", "Summarize what this script does", "Can you document this function?",
             "Any edge cases I'm missing?", "Code review please, be strict", "Why does this crash?",
             "what's the time complexity of this?", "rewrite using a list comprehension / map",
             "¿Qué hace este código?", "Was macht dieser Code?", "Corrige ce code", "このコードのバグを直して"]
ERRORS = ["TypeError: 'NoneType' object is not subscriptable", "ModuleNotFoundError: No module named 'numpy'",
          "java.lang.NullPointerException at com.app.Main.run(Main.java:42)", "Segmentation fault (core dumped)",
          "Uncaught TypeError: Cannot read properties of undefined (reading 'map')",
          "error[E0382]: borrow of moved value: `s`", "fatal: refusing to merge unrelated histories",
          "npm ERR! code ERESOLVE unable to resolve dependency tree", "Permission denied (publickey).",
          "IndentationError: unexpected indent", "KeyError: 'user_id'", "panic: runtime error: index out of range [3] with length 3",
          "ERROR 1045 (28000): Access denied for user 'root'@'localhost'", "CrashLoopBackOff",
          "Access to fetch at 'http://localhost:5000' from origin 'http://localhost:3000' has been blocked by CORS policy",
          "RecursionError: maximum recursion depth exceeded", "OSError: [Errno 98] Address already in use",
          "error: failed to push some refs to 'origin'", "SyntaxError: Unexpected token '<' in JSON at position 0",
          "ValueError: could not convert string to float: ''", "docker: Error response from daemon: port is already allocated",
          "ImportError: cannot import name 'x' from partially initialized module", "CUDA out of memory. Tried to allocate 2.00 GiB",
          "undefined reference to `main'", "Error: Cannot find module 'express'", "ConcurrentModificationException",
          "psycopg2.OperationalError: could not connect to server: Connection refused", "E: Unable to locate package",
          "TS2322: Type 'string' is not assignable to type 'number'", "ssl.SSLCertVerificationError: certificate verify failed"]
DEVOPS = [
    "Write a Dockerfile for a {L} web app", "Write a docker-compose file with {svc} and {svc2}",
    "Create a GitHub Actions workflow that lints and tests a {L} project", "Write a GitLab CI pipeline with build, test and deploy stages",
    "Write a Kubernetes Deployment and Service for {svc}", "Write a Helm chart for {svc}", "Write a Makefile for a {L} project",
    "Write a Terraform module for an AWS VPC with two subnets", "Write an nginx config to reverse proxy {svc}",
    "Write a systemd unit file for a {L} service", "Write an Ansible playbook that installs {svc}",
    "How do I set up a cron job that runs a backup script every night at 2am?", "Bash script to back up a postgres database to S3",
    "How do I squash my last {n} commits in git?", "How do I revert a pushed commit?", "How do I undo git add?",
    "git command to see which files changed between two branches", "How do I rename a branch locally and on the remote?",
    "How do I find which process is listening on port {n}?", "Write a bash loop that pings a list of hosts",
    "How to find and replace a string across all files with sed?", "How do I grep recursively but exclude node_modules?",
    "Write a PowerShell script that restarts a Windows service if it's stopped", "How do I set environment variables in a Dockerfile?",
    "Write a Jenkinsfile that builds a Maven project", "kubectl command to get logs from a crashed pod",
    "Write a Prometheus alert rule for high CPU", "How do I mount a volume in docker run?", "Write a .gitignore for a {L} project",
    "Write a SQL query to get the top {n} customers by revenue", "SQL: find duplicate emails in the users table",
    "Write a SQL query that returns monthly active users", "Write a MongoDB aggregation that groups orders by status",
    "Convert this SQL to a SQLAlchemy query: SELECT * FROM posts WHERE author_id = 3 ORDER BY created DESC",
    "Write a regex that matches IPv4 addresses", "Write a regex to extract dates in YYYY-MM-DD format from a log",
    "Write an SQL migration that adds a non-null column with a default", "Explain the difference between INNER JOIN and LEFT JOIN with an example",
    "Write a pyproject.toml for a package with pytest and ruff", "Write a webpack config for a React app",
    "How do I profile memory usage in a {L} program?", "Set up ESLint and Prettier for a TypeScript project",
]
SERVICES = ["postgres", "redis", "nginx", "a Flask API", "a Node.js API", "rabbitmq", "elasticsearch", "grafana",
            "a Django app", "kafka", "mysql", "a React frontend", "minio", "a Go microservice"]
CODE_CONCEPTS = [
    "What's the difference between a list and a tuple in Python?", "Explain closures in JavaScript with an example",
    "What is a race condition and how do I prevent it?", "Explain Rust ownership and borrowing",
    "When should I use an interface vs an abstract class in Java?", "How does async/await work in {L}?",
    "What are Python decorators and how do I write one?", "Explain the event loop in Node.js",
    "What is the difference between == and === in JavaScript?", "How does garbage collection work in Go?",
    "What's the time complexity of quicksort and why?", "Explain big O notation with code examples",
    "What is dependency injection?", "What are generics in {L} and when are they useful?",
    "Explain the difference between processes and threads in {L}", "What is a memory leak and how do I find one in {L}?",
    "How do hash maps handle collisions?", "What is tail recursion?", "Explain SOLID principles with {L} examples",
    "What's the difference between REST and GraphQL APIs?", "What does the 'static' keyword mean in {L}?",
    "What's the difference between a shallow and a deep copy?", "How do I use goroutines and channels?",
    "What is a mutex vs a semaphore?", "Explain React hooks like useEffect and useMemo",
    "What's the difference between git merge and git rebase?", "What is the N+1 query problem in ORMs?",
    "How do database indexes work and when should I add one?", "What is a monad in Haskell, explained with code?",
    "When should I use a linked list instead of an array?", "What does `yield` do in Python?",
    "Explain pointers and references in C++", "What is the virtual DOM?", "What is CORS and how do I configure it?",
    "How do I write a unit test with mocks in {L}?", "Explain how HTTPS/TLS handshakes work from a developer's view",
]
CODE_HOWTO = ["How do I {t} in {L}?", "how to {t} {L}", "What's the best way to {t} in {L}?", "{L} {t}?",
              "In {L}, how can I {t}?", "Quick way to {t} with {L}?"]
HOWTO_TASKS = ["read a file line by line", "sort a dictionary by value", "reverse a string", "make an HTTP POST request",
               "parse JSON", "convert a string to a date", "remove an element from an array", "check if a key exists in a map",
               "run a shell command and capture its output", "merge two dictionaries", "iterate over a map",
               "handle exceptions", "format a float to two decimals", "split a string by commas",
               "get the current timestamp", "read environment variables", "create a virtual environment",
               "write to a CSV file", "define an enum", "spawn a thread", "connect to a SQLite database",
               "generate a UUID", "deep copy an object", "send a request with a timeout", "pad a string with zeros"]


def long_code() -> str:
    parts, target = [], num(1200, 4500)
    while sum(map(len, parts)) < target:
        parts.append(pick(SNIPPETS))
    return "\n\n".join(parts)


SHELL_CMDS = ["chmod +x deploy.sh", "chmod 644 config.yml", "chown -R www-data:www-data /var/www", "ls -la", "grep -rn TODO src/",
              "tar -xzvf backup.tar.gz", "sudo !!", "kill -9 1234", "ps aux | grep python", "df -h", "du -sh *", "nohup ./run.sh &",
              "ssh -L 8080:localhost:80 user@host", "find . -type f -mtime +30 -delete", "curl -I https://example.com",
              "git stash pop", "git cherry-pick abc123", "git reset --hard HEAD~1", "git bisect", "docker ps -a",
              "docker exec -it web sh", "kubectl apply -f deploy.yaml", "npm ci", "pip freeze > requirements.txt",
              "export PATH=$HOME/bin:$PATH", "command 2>&1 | tee log.txt", "ln -s /opt/app/current app", "crontab -e",
              "systemctl restart nginx", "journalctl -u myapp -f", "lsof -i :8080", "umask 022", "set -x", "xargs -n1",
              "sed -i 's/foo/bar/g' *.txt", "awk -F, '{print $2}' data.csv", "rsync -avz src/ host:/backup/", "source .venv/bin/activate"]
ARTIFACTS = ["a JSON Schema", "a protobuf message definition", "SQL tables (DDL)", "an OpenAPI spec", "a Prisma schema",
             "a Mongoose model", "a GraphQL API", "an HTML landing page", "a CSS grid layout", "a Redux slice", "a Vue component",
             "a Mermaid ER diagram", "Django models", "a database schema", "REST endpoints", "a CLI", "a cron job",
             "SQLAlchemy models", "TypeScript interfaces", "a state machine"]
DOMAINS = ["a blog", "an online store", "a library system", "a hotel booking app", "a todo app", "a social network",
           "a school timetable", "an inventory system", "a ride-sharing service", "a recipe site", "a bug tracker"]


SCRIPT_TASKS = ["renames files by their creation date", "backs up my documents folder every night", "emails me when a web page changes",
                "downloads every image from a web page", "converts PDFs to plain text", "logs my internet speed every hour",
                "sorts my downloads folder by file type", "scrapes product prices from a shop", "posts to social media on a schedule",
                "tracks my expenses from a bank CSV", "resizes photos for Instagram", "merges several Excel sheets into one",
                "alerts me when CPU usage goes above 90%", "plays a sound when my build finishes", "generates invoices from a spreadsheet",
                "deletes duplicate photos", "reminds me to drink water", "pulls the weather from an API and prints it",
                "converts Markdown files to HTML", "checks a list of URLs for broken links", "syncs two folders",
                "reads sensor data from a Raspberry Pi", "transcribes audio files with an API", "answers Discord messages with a bot",
                "fills in a web form automatically", "splits a big CSV into smaller files", "counts how many times each word appears in a book"]
GAMES = ["snake", "tic-tac-toe", "pong", "tetris", "hangman", "flappy bird", "minesweeper", "2048", "breakout", "space invaders",
         "a memory card game", "rock paper scissors", "a text adventure", "connect four"]
GAME_LIBS = ["pygame", "JavaScript and canvas", "Unity", "Godot", "tkinter", "p5.js", "the terminal", "React", "Java Swing", "Python"]
TECH = ["CSS grid", "flexbox", "my React component", "useEffect", "my Docker container", "git rebase", "my virtualenv", "npm install",
        "webpack", "TypeScript generics", "my Kubernetes ingress", "nginx", "my PostgreSQL index", "Redis caching", "my GraphQL query",
        "JWT auth", "OAuth login", "my websocket connection", "pandas merge", "numpy broadcasting", "my regex", "my bash loop",
        "my cron job", "SSH", "terraform apply", "my AWS Lambda", "Django migrations", "Flask routing", "Spring Boot", "Rust lifetimes",
        "Go modules", "my C pointer code", "my unit tests", "mocking in pytest", "the CI pipeline", "Tailwind classes", "Next.js routing",
        "Vue props", "my Android app", "SwiftUI layout", "my Unity script", "Excel VBA macro", "async/await", "my API endpoint",
        "CORS", "my Makefile", "the linker", "gradle build", "my Jupyter notebook", "matplotlib plot", "my SQL join"]
DEV_TERMS = ["segfault", "null pointer exception", "stack overflow error", "race condition", "deadlock", "closure", "callback",
             "promise", "mutex", "hash table", "linked list", "binary tree", "REST API", "SDK", "compiler", "interpreter",
             "garbage collector", "memory leak", "microservice", "Docker container", "ORM", "regular expression", "unit test",
             "merge conflict", "pull request", "lambda function", "pointer", "package manager", "virtual environment",
             "Kubernetes pod", "webhook", "CI/CD pipeline", "linter", "stack trace", "race detector", "monorepo", "API rate limit",
             "foreign key", "database index", "cache invalidation", "off-by-one error", "big-O notation", "type annotation"]


API_PAIRS = [("malloc", "realloc"), ("let", "var"), ("map", "filter"), ("fork", "exec"), ("GET", "POST"), ("PUT", "PATCH"),
             ("== ", "is"), ("ArrayList", "LinkedList"), ("HashMap", "TreeMap"), ("useMemo", "useCallback"), ("COPY", "ADD in a Dockerfile"),
             ("CMD", "ENTRYPOINT"), ("git reset", "git revert"), ("WHERE", "HAVING"), ("UNION", "UNION ALL"), ("the stack", "the heap"),
             ("pass by value", "pass by reference"), ("sync", "async functions"), ("StringBuilder", "String"), ("struct", "class in C++"),
             ("Promise.all", "Promise.allSettled"), ("append", "extend in Python"), ("@staticmethod", "@classmethod"), ("Vec", "slice in Rust"),
             ("goroutines", "threads"), ("INNER JOIN", "OUTER JOIN"), ("npm", "yarn"), ("localStorage", "sessionStorage"),
             ("printf", "puts"), ("strcpy", "strncpy"), ("deepcopy", "copy"), ("pip", "conda"), ("TCP sockets", "websockets")]


def gen_code_plain() -> str:
    """Coding requests in everyday words: no snippet, often no language name."""
    r = R.random()
    if r < 0.12:
        a, b = pick(API_PAIRS)
        return noisy(pick([f"explain the difference between {a} and {b}", f"{a} vs {b}?", f"When should I use {a} instead of {b}?",
                           f"What's the difference between {a} and {b}?", f"Is {a} faster than {b}?", f"{a} or {b}, which one should I use?"]))
    if r < 0.35:
        return noisy(pick([f"Can you help me write a script that {pick(SCRIPT_TASKS)}?", f"Write a program that {pick(SCRIPT_TASKS)}",
                           f"I need a small tool that {pick(SCRIPT_TASKS)}", f"Make me a bot that {pick(SCRIPT_TASKS)}",
                           f"How would I automate something that {pick(SCRIPT_TASKS)}?", f"write a python script that {pick(SCRIPT_TASKS)}",
                           f"Build a command-line app that {pick(SCRIPT_TASKS)}", f"Create a Chrome extension that {pick(SCRIPT_TASKS)}"]))
    if r < 0.45:
        return noisy(pick([f"Create a simple {pick(GAMES)} game in {pick(GAME_LIBS)}", f"Make {pick(GAMES)} with {pick(GAME_LIBS)}",
                           f"How do I code {pick(GAMES)} in {pick(GAME_LIBS)}?", f"Build a {pick(GAMES)} clone using {pick(GAME_LIBS)}"]))
    if r < 0.75:
        t = pick(TECH)
        return noisy(pick([f"why is {t} not working", f"{t} isn't working and I don't know why", f"How do I fix {t}?",
                           f"{t} keeps failing, help", f"why does {t} behave differently in production?", f"How do I use {t} properly?",
                           f"what am I doing wrong with {t}?", f"{t} is really slow, how can I speed it up?", f"best practices for {t}?"]))
    d = pick(DEV_TERMS)
    return noisy(pick([f"what is a {d}", f"What's a {d} in programming?", f"explain {d} to a junior developer", f"How do I avoid a {d}?",
                       f"{d} vs {pick(DEV_TERMS)}: what's the difference?", f"Can you give an example of a {d}?", f"what causes a {d}?"]))


def gen_code() -> str:
    L = pick(PLANGS)
    r = R.random()
    if r < 0.25:
        return gen_code_plain()
    r = R.random()
    if r < 0.08:
        cmd = pick(SHELL_CMDS)
        return noisy(pick([f"What does `{cmd}` do?", f"what does {cmd} mean", f"Explain this command: {cmd}",
                           f"is it safe to run {cmd}?", f"{cmd} - what does that do?", f"Can you break down `{cmd}` for me?",
                           f"what's the windows equivalent of {cmd}"]))
    if r < 0.14:
        return noisy(pick([f"Write {pick(ARTIFACTS)} for {pick(DOMAINS)}", f"Design {pick(ARTIFACTS)} for {pick(DOMAINS)}",
                           f"Create {pick(ARTIFACTS)} for {pick(DOMAINS)} in {L}", f"Generate {pick(ARTIFACTS)} for {pick(DOMAINS)}"]))
    if r < 0.20:
        L2 = pick(PLANGS)
        snip = pick(SNIPPETS)
        return pick([f"Translate this {L} into {L2}: {snip}", f"Convert this code to {L2}:\n{snip}", f"{snip}\n\nport this to {L2}",
                     f"Rewrite this {L} snippet in {L2}: {snip}", f"How would this look in {L2}?\n{snip}",
                     f"Translate the following {L} code to idiomatic {L2}.\n\n{snip}"])
    r = R.random()
    if r < 0.25:
        return noisy(pick(CODE_VERBS).format(L=L, t=pick(CODE_TASKS)))
    if r < 0.50:
        snip = long_code() if maybe(0.2) else pick(SNIPPETS)
        ask = pick(CODE_ASKS).format(L=L)
        if maybe(0.3):
            snip = f"```{pick(['', 'python', 'js', 'java', 'go', 'sql', 'bash', 'rust', 'cpp'])}\n{snip}\n```"
        style = R.randrange(4)
        if style == 0:
            return f"{snip}\n\n{noisy(ask, 0.2)}"
        if style == 1:
            return f"{noisy(ask, 0.2)}\n\n{snip}"
        if style == 2:
            return f"{ask}: {snip}"
        return f"{pick(['I have this code', 'My code', 'Here is my function', 'Look at this', 'This is from our codebase'])}:\n{snip}\n{ask}"
    if r < 0.62:
        err = pick(ERRORS)
        return noisy(pick([f"How do I fix this error: {err}", f"{err}\n\nwhat does this mean?", f"Getting \"{err}\" in my {L} app, help",
                           f"why am I getting {err}", f"I keep getting this error when I run my script:\n{err}",
                           f"{pick(SNIPPETS)}\n\nThis gives {err}. Why?", f"Error: {err} - any idea?",
                           f"Help me debug: {err}"]))
    if r < 0.80:
        n = num(2, 10)
        return noisy(pick(DEVOPS).format(L=L, svc=pick(SERVICES), svc2=pick(SERVICES), n=n if n < 10 else 8080))
    if r < 0.90:
        return noisy(pick(CODE_CONCEPTS).format(L=L))
    return noisy(pick(CODE_HOWTO).format(L=L, t=pick(HOWTO_TASKS)))


# ---------------------------------------------------------------- reasoning
REASON_SUFFIX = ["", "", "", " Show your work.", " Explain step by step.", " Think it through step by step.",
                 " Show the steps.", " Justify your answer.", " Explain your reasoning.", " Just the answer please.",
                 " Walk me through it.", " Can you explain how you got it?"]
ITEMS = ["apples", "pencils", "tickets", "books", "cupcakes", "shirts", "marbles", "notebooks", "oranges", "stickers"]


def word_problem() -> str:
    a, b, c = num(2, 60), num(2, 40), num(2, 12)
    n1, n2 = pick(FIRST), pick(FIRST)
    it = pick(ITEMS)
    k = R.randrange(24)
    if k == 0:
        return f"{n1} has {a} {it}. {pick(['She', 'He'])} gives {min(a - 1, b)} to {n2} and then buys {c} more. How many {it} does {n1} have now?"
    if k == 1:
        return f"A train leaves at {num(6, 11)}:{pick(['00', '15', '30', '45'])} and travels {a * 10} km at {b + 40} km/h. What time does it arrive?"
    if k == 2:
        return f"If {c} workers can paint a house in {a} days, how long would it take {c + b} workers?"
    if k == 3:
        return f"A shirt costs ${a + 10}. It is discounted by {pick([10, 15, 20, 25, 30, 40])}% and then taxed at {pick([5, 8, 10, 20])}%. What is the final price?"
    if k == 4:
        return f"The sum of two numbers is {a + b} and their difference is {abs(a - b)}. What are the numbers?"
    if k == 5:
        return f"{n1} is {c} times as old as {n2}. In {b} years {n1} will be twice as old as {n2}. How old are they now?"
    if k == 6:
        return f"A recipe needs {c} eggs for {num(2, 6)} people. How many eggs for {a} people?"
    if k == 7:
        return f"A car uses {c} liters of fuel per 100 km. Fuel costs {money()} per liter. How much does a {a * 10} km trip cost?"
    if k == 8:
        return f"Two cyclists start {a * 5} km apart and ride toward each other at {b} km/h and {c + 10} km/h. When and where do they meet?"
    if k == 9:
        return f"A tank holds {a * 10} liters. Pipe A fills it in {c} hours and pipe B drains it in {c + num(1, 9)} hours. With both open, how long to fill it?"
    if k == 10:
        return f"{n1} invests {money()} at {num(2, 9)}% annual interest compounded {pick(['monthly', 'yearly', 'quarterly'])}. How much after {c} years?"
    if k == 11:
        return f"A class has {a} students; {num(10, 90)}% are girls. How many boys are there?"
    if k == 12:
        return f"A rectangle is {a} cm long and {b} cm wide. What is its area, perimeter and diagonal?"
    if k == 13:
        return f"If I walk at {num(3, 6)} km/h for {c * 10} minutes and then run at {num(8, 14)} km/h for {b} minutes, how far did I go?"
    if k == 14:
        return f"A store sold {a * 3} {it} on Monday, {b}% more on Tuesday and half as many on Wednesday as on Tuesday. What was the total?"
    if k == 15:
        return f"How many {it} costing ${c} each can I buy with ${a * 7}, and how much change do I get?"
    if k == 16:
        return f"A mixture of {a} liters is {c * 5}% juice. How much water must be added to make it {c * 2}% juice?"
    if k == 17:
        return f"{n1} reads {b} pages a day. The book has {a * 20} pages. After {c} days, what fraction is left?"
    if k == 18:
        return f"The average of {c} numbers is {a}. When one more number is added the average becomes {a + 2}. What is the new number?"
    if k == 19:
        return f"A phone plan costs ${c * 5} per month plus ${num(1, 9)}0 cents per GB. If the bill was ${a + c * 5}, how many GB were used?"
    if k == 20:
        return f"A bakery makes {a * 12} loaves per day and sells {pick([60, 70, 75, 80, 90])}% of them at ${c}. What is the daily revenue?"
    if k == 21:
        return f"Si {n1} tiene {a} euros y gasta {min(a - 1, b)} en libros, ¿cuánto le queda? Y si luego gana el {c * 5}% de eso, ¿cuánto tiene?"
    if k == 22 and maybe(0.5):
        return pick([f"Si un coche recorre {a * 10} km en {c} horas, ¿cuál es su velocidad media?",
                     f"Un grifo llena un depósito de {a * 10} litros en {c} horas. ¿Cuántos litros por minuto son?",
                     f"Una camisa cuesta {a} euros y tiene un descuento del {pick([10, 20, 30])} %. ¿Cuánto pago?",
                     f"Se un treno percorre {a * 10} km in {c} ore, qual è la sua velocità media?",
                     f"Se eu poupar {b * 10} reais por mês, quanto terei em {c} anos?",
                     f"Wenn {c} Arbeiter {a} Tage brauchen, wie lange brauchen {c + 2} Arbeiter?",
                     f"Une voiture consomme {c} litres aux 100 km. Combien pour {a * 10} km ?"])
    if k == 22:
        return f"Ein Zug fährt {a * 10} km in {c} Stunden. Wie schnell ist er im Durchschnitt, und wie lange braucht er für {b * 10} km?"
    return f"Un magasin vend {a} {pick(['stylos', 'cahiers', 'livres'])} à {c} euros pièce avec une remise de {pick([10, 20, 25])} %. Quel est le prix total ?"


def algebra() -> str:
    a, b, c, d = num(2, 12), num(1, 30), num(2, 9), num(1, 40)
    x = pick(["x", "y", "n", "t"])
    k = R.randrange(14)
    forms = [
        f"Solve for {x}: {a}{x} + {b} = {c}{x} - {d}",
        f"Solve {x}^2 - {a + c}{x} + {a * c} = 0",
        f"Find the roots of {a}{x}^2 + {b}{x} - {d}",
        f"Solve the system: {a}x + {c}y = {b}, {c}x - y = {d}",
        f"Simplify ({x}^2 - {a * a}) / ({x} - {a})",
        f"Factor {x}^2 + {a + c}{x} + {a * c}",
        f"Solve the inequality {a}{x} - {b} > {d}",
        f"Expand ({x} + {a})^{pick([2, 3])}",
        f"If f({x}) = {a}{x}^2 - {b} and g({x}) = {c}{x} + 1, what is f(g(2))?",
        f"Solve for {x}: log_{pick([2, 3, 10])}({x}) = {c}",
        f"Solve {a}^{x} = {a ** c}",
        f"Find {x} if {x}/{a} + {x}/{c} = {b}",
        f"Solve |{a}{x} - {b}| = {d}",
        f"What is the slope and intercept of the line through ({a}, {b}) and ({c}, {d})?",
    ]
    return forms[k]


def calculus() -> str:
    f = pick(["x^3 - 4x + 1", "sin(x) * cos(x)", "e^(2x) * x", "ln(x^2 + 3)", "sqrt(1 + x^2)", "x / (1 + x^2)",
              "tan(x)", "x^2 * e^(-x)", "1 / (x^2 - 1)", "arctan(3x)", "cos^2(x)", "x ln x", "(2x + 1)^5",
              "e^x sin x", "sec(x)", "x^x"])
    return pick([f"Find the derivative of {f}", f"Differentiate {f} with respect to x", f"Integrate {f} dx",
                 f"Compute the integral of {f} from 0 to 1", f"What is the second derivative of {f}?",
                 f"Find the critical points of {f}", f"Find the Taylor series of {f} around 0 up to x^4",
                 f"Evaluate the limit of ({f}) as x approaches 0", f"Is {f} increasing on [1, 2]? Prove it.",
                 f"Find the area under the curve y = {f} between x = 1 and x = 3",
                 f"Solve the differential equation dy/dx = {pick(['2y', 'x y', 'y + x', 'y^2'])} with y(0) = 1",
                 f"Find the maximum of {f} on the interval [0, 2]"])


def probability() -> str:
    n, k = num(2, 10), num(1, 4)
    return pick([f"What's the probability of getting exactly {k} heads in {n + k} coin flips?",
                 f"Two dice are rolled. What is the probability that the sum is {num(2, 12)}?",
                 f"A bag has {n} red and {k + 2} blue balls. If I draw {pick([2, 3])} without replacement, what's the chance they're all red?",
                 f"What is the probability of drawing {pick(['two aces', 'a flush', 'a pair', 'a heart then a spade'])} from a standard deck?",
                 f"How many ways can {n + 2} people be arranged in a line if two of them must sit together?",
                 f"In how many ways can a committee of {k + 1} be chosen from {n + 6} people?",
                 f"How many distinct arrangements of the letters in '{pick(['BANANA', 'MISSISSIPPI', 'LETTER', 'STATISTICS', 'COMMITTEE'])}' are there?",
                 f"A test is {90 + k}% accurate and the condition has {k}% prevalence. If someone tests positive, what's the probability they have it?",
                 f"What is the expected value of rolling a die {n} times and summing the results?",
                 f"If the probability of rain is {n * 5}% each day independently, what's the chance of rain on at least one of {k + 2} days?",
                 "What's the expected number of rolls to see every face of a six-sided die?",
                 f"A password is {n} characters from 26 letters and 10 digits. How many combinations are there?",
                 f"Compute the mean, median and standard deviation of: {', '.join(str(num(1, 99)) for _ in range(num(5, 9)))}",
                 f"X is normally distributed with mean {n * 10} and sd {k + 2}. What is P(X > {n * 10 + k + 2})?"])


def number_theory() -> str:
    a, b = num(12, 999), num(12, 999)
    return pick([f"What is the GCD of {a} and {b}?", f"Find the LCM of {a % 90 + 4} and {b % 60 + 6}",
                 f"Is {a * 2 + 1} a prime number?", f"What is {a} mod {b % 17 + 2}?", f"Find the prime factorization of {a * 6}",
                 f"What is the last digit of {num(2, 9)}^{num(20, 200)}?", f"How many divisors does {a * 4} have?",
                 f"Convert {a} to binary and hexadecimal, explaining the steps", f"What is {a} × {b}?",
                 f"Calculate {a} + {b} × {num(2, 9)} - {num(1, 50)}", f"What's {num(5, 95)}% of {a * 10}?",
                 f"What is {a / 8:.3f} as a fraction?", f"Compute {a} divided by {b % 23 + 2} to 3 decimal places",
                 f"What is the sum of the first {a % 90 + 10} positive integers?", f"Find all integers n such that n^2 + {b % 9 + 1} is divisible by {b % 7 + 3}",
                 f"Is {a * 3} divisible by 9? How can you tell?", f"What is the square root of {a * a}?"])


def sequence() -> str:
    s0, d, r = num(1, 9), num(2, 9), num(2, 4)
    seqs = [[s0 + d * i for i in range(5)], [s0 * r ** i for i in range(5)], [i * i + s0 for i in range(1, 6)],
            [s0, s0 + 1, 2 * s0 + 1, 3 * s0 + 2, 5 * s0 + 3], [i ** 3 for i in range(1, 6)], [s0 + i * (i + 1) for i in range(5)]]
    seq = ", ".join(map(str, pick(seqs)))
    return pick([f"What comes next in the sequence {seq}, ...?", f"Find the pattern: {seq}, ?", f"Next number: {seq}",
                 f"Find a formula for the nth term of {seq}, ...", f"Continue the sequence {seq} and explain the rule"])


def geometry() -> str:
    a, b = num(2, 30), num(2, 30)
    return pick([f"A triangle has sides {a}, {b} and {a + b - 1}. What is its area?", f"What is the volume of a sphere with radius {a} cm?",
                 f"A right triangle has legs {a} and {b}. How long is the hypotenuse?", f"Find the area of a circle with circumference {a * 2}π",
                 f"What is the sum of the interior angles of a {a % 10 + 3}-sided polygon?", f"A cylinder has radius {a} and height {b}. Find its surface area.",
                 f"Two angles of a triangle are {a + 20}° and {b + 30}°. What is the third?", f"What's the distance between the points ({a}, {b}) and ({b}, -{a})?",
                 f"A square's diagonal is {a} cm. What is its area?", f"How many faces, edges and vertices does a {pick(['cube', 'tetrahedron', 'octahedron', 'triangular prism'])} have?",
                 f"A cone has radius {a} and slant height {a + b}. What is its lateral surface area?",
                 f"A ladder {a + b} feet long leans against a wall with its base {a} feet from the wall. How high does it reach?"])


PROOFS = ["there are infinitely many primes", "the square root of 2 is irrational", "the sum of the angles in a triangle is 180 degrees",
          "n^3 - n is divisible by 6 for every integer n", "the sum of the first n odd numbers is n^2", "every tree with n nodes has n-1 edges",
          "there is no largest even number", "the product of two odd numbers is odd", "2^n > n^2 for all n >= 5",
          "the harmonic series diverges", "a graph is bipartite iff it has no odd cycle", "log2(3) is irrational",
          "every integer greater than 1 has a prime factor", "the set of real numbers is uncountable",
          "the composition of two injective functions is injective", "1 + 2 + ... + n = n(n+1)/2",
          "in any group of 6 people there are 3 mutual friends or 3 mutual strangers", "e is irrational",
          "the derivative of x^n is n x^(n-1)", "a^2 + b^2 >= 2ab for all real a and b", "every finite integral domain is a field",
          "the halting problem is undecidable", "there are as many even numbers as natural numbers",
          "if n^2 is even then n is even", "the angle in a semicircle is a right angle", "sqrt(6) is irrational"]
PUZZLES = [
    "You have two ropes that each take an hour to burn unevenly. How do you measure 45 minutes?",
    "A man looks at a portrait and says 'Brothers and sisters I have none, but that man's father is my father's son.' Who is in the portrait?",
    "You have 8 balls, one is heavier. With a balance scale, what's the minimum number of weighings to find it?",
    "Three switches outside a room control three bulbs inside. You can enter the room only once. How do you match them?",
    "A farmer must cross a river with a wolf, a goat and a cabbage. The boat carries him and one item. How does he do it?",
    "Knights always tell the truth, knaves always lie. A says 'B is a knave.' B says 'A and I are the same type.' What are they?",
    "If all Zorks are Morks and some Morks are Porks, must some Zorks be Porks?",
    "There are 100 lockers and 100 students toggling them in the usual pattern. Which lockers are open at the end?",
    "Using a 3-liter jug and a 5-liter jug, how do you measure exactly 4 liters?",
    "A snail climbs 5 meters each day and slips 4 meters each night in a 30-meter well. When does it get out?",
    "Five houses, five owners, each with a different pet and drink... who owns the fish? Walk through the Einstein riddle.",
    "You meet two guards, one always lies and one always tells the truth. What single question finds the safe door?",
    "Is the statement 'This sentence is false' true or false? Explain the paradox.",
    "How many squares are on a chessboard, counting all sizes?",
    "A bat and a ball cost $2.20 together and the bat costs $2 more than the ball. What does the ball cost?",
    "Monty Hall: should you switch doors? Prove it.", "Solve this Sudoku row logic: which digit must go in the empty cell if the row has 1,2,3,5,6,7,8,9?",
    "If it takes 3 hens 3 days to lay 3 eggs, how many eggs do 12 hens lay in 12 days?",
    "A clock loses 10 minutes every hour. If set correctly at noon, what real time is it when it shows 6pm?",
    "Some of my friends are doctors; all doctors are busy. Can I conclude that some of my friends are busy?",
    "Determine whether this argument is valid: All birds can fly. Penguins are birds. So penguins can fly.",
    "Which is heavier: a kilogram of feathers or a kilogram of steel? Explain the trick.",
    "How many times a day do the hour and minute hands of a clock overlap?",
    "Place 8 queens on a chessboard so no two attack each other. How many solutions exist and how would you reason about it?",
    "A is taller than B, C is shorter than B, D is taller than A. Who is the second tallest?",
    "Every day a pond's algae doubles; it covers the pond on day 30. When was it a quarter covered?",
    "Four people cross a bridge at night with one flashlight in 1, 2, 7 and 10 minutes. What's the fastest crossing?",
    "There are three boxes, one with gold. The labels say: 'gold is here', 'gold is not here', 'gold is not in box 1'. Only one label is true. Where is the gold?",
    "If today is Wednesday, what day will it be 1000 days from now?",
    "Tom says 'Mary is lying'. Mary says 'Ann is lying'. Ann says 'Tom and Mary are both lying'. Who is truthful?",
]


UNITS = [("minutes", "days", None), ("seconds", "hours", None), ("ounces", "pounds", None), ("centimeters", "miles", None),
         ("milliliters", "gallons", None), ("hours", "weeks", None), ("feet", "kilometers", None), ("grams", "tons", None)]


def quick_math() -> str:
    a, b, c, n = num(3, 99), num(2, 60), num(2, 12), num(3, 30)
    u1, u2, _ = pick(UNITS)
    return pick([f"What is {pick([5, 12, 15, 18, 25, 35, 40, 62, 75, 120])}% of {a * 10}?", f"What's {a} times {b}?",
                 f"How much is {a * 7} plus {b * 3} minus {c * 11}?", f"Calculate {c}^{num(3, 9)}", f"what is {a}/{b} as a decimal",
                 f"How many {u1} are there in {n} {u2}?", f"{a * b} divided by {b}, times {c}?", f"What is {a}² - {b}²?",
                 f"How many edges does a complete graph on {n} vertices have?", f"How many subsets does a set of {c} elements have?",
                 f"How many digits does {c}^{n + 10} have?", f"How many zeros are at the end of {n + 20}!?",
                 f"How many {c}-letter words can be made from the letters A to {chr(64 + n % 20 + c)} without repetition?",
                 f"How many triangles can be formed from {n} points, no three collinear?", f"How many lines pass through {n} points in general position?",
                 f"How many integers between 1 and {a * 20} are divisible by {c} or {c + 1}?", f"How many squares are there on a {c}x{c} grid?",
                 f"How many ways can I choose {c % 5 + 2} toppings out of {n}?", f"How many paths are there from one corner of a {c}x{c} grid to the opposite corner moving only right or up?",
                 f"Which is bigger, {c}^{n} or {n}^{c}?", f"Which is larger: {a}/{b} or {b}/{a + 3}?", f"Is {a * 11} divisible by 11? Why?",
                 f"Estimate how many {pick(['piano tuners work in Chicago', 'golf balls fit in a school bus', 'heartbeats a person has in a lifetime', 'words are in a 300-page novel', 'liters of water a person drinks in a year'])}.",
                 f"Round {a * 1.37:.3f} to two decimal places and explain", f"What is {a} in Roman numerals, and how do you work it out?",
                 f"If today is {pick(WEEKDAYS)}, what day of the week will it be in {a * 3} days?",
                 f"What time will it be {a * 7} minutes after {num(1, 12)}:{pick(['05', '20', '45'])}?",
                 f"A {pick(['meeting', 'flight', 'movie'])} starts at {num(1, 11)}:{pick(['15', '40', '50'])} and lasts {c * 17} minutes. When does it end?"])


def arithmetic() -> str:
    """Bare arithmetic in the many ways people type it."""
    a, b = num(2, 9999), num(2, 999)
    op = pick(["*", "x", "×", "+", "-", "/", "^", "÷"])
    expr = pick([f"{a} {op} {b}", f"{a}{op}{b}", f"({a} + {b % 50}) {op} {num(2, 20)}", f"sqrt({a})", f"{b}!", f"{a} mod {b % 30 + 2}"])
    return pick([f"What is {expr}?", f"what's {expr}", f"{expr} = ?", f"{expr}?", f"Calculate {expr}", f"compute {expr}",
                 f"How much is {expr}?", f"Is {a} prime?", f"Is {a} a perfect square?", f"Is {a} divisible by {b % 12 + 2}?",
                 f"Quick math: {expr}", f"Can you work out {expr}?", f"Evaluate {expr}", f"{expr} equals what?",
                 f"Cuánto es {expr}?", f"Was ist {expr}?", f"Combien font {expr} ?"])


def logic_puzzle() -> str:
    """Ordering / truth-teller puzzles over random names."""
    a, b, c, d = R.sample(FIRST, 4)
    rel = pick([("is taller than", "tallest", "shortest"), ("finished ahead of", "winner", "last"), ("is older than", "oldest", "youngest"),
                ("scored more than", "top scorer", "lowest scorer"), ("arrived before", "first to arrive", "last to arrive")])
    facts = [f"{a} {rel[0]} {b}.", f"{c} {rel[0]} {a}.", f"{b} {rel[0]} {d}.", f"{d} is not the {rel[2]}." if maybe(0.5) else f"{c} is not the {rel[1]}."]
    R.shuffle(facts)
    q = pick([f"Who is the {rel[1]}?", f"Who is the {rel[2]}?", "Rank all four.", "Is that consistent? Who is second?", "Who wins?"])
    return pick([" ".join(facts) + " " + q,
                 f"{a} says {b} is lying. {b} says {c} is lying. {c} says {a} and {b} are both lying. Who tells the truth?",
                 f"{a}, {b} and {c} each have a different pet: a cat, a dog and a fish. {a} doesn't have the dog. {c} has the fish. Who has the cat?",
                 f"{a} sits left of {b}; {c} sits right of {b}; {d} is at one end next to {c}. What's the seating order?",
                 f"Exactly one of {a}, {b} and {c} ate the cake. {a}: 'It was {b}.' {b}: 'It wasn't me.' {c}: 'It wasn't me.' Only one tells the truth. Who ate it?"])


def gen_reasoning() -> str:
    r = R.random()
    if r < 0.06:
        return logic_puzzle()
    if r < 0.13:
        return arithmetic()
    r = R.random()
    if r < 0.12:
        return noisy(quick_math() + pick(REASON_SUFFIX), 0.25)
    if r < 0.40:
        q = word_problem()
    elif r < 0.48:
        q = algebra()
    elif r < 0.58:
        q = calculus()
    elif r < 0.68:
        q = probability()
    elif r < 0.78:
        q = number_theory()
    elif r < 0.83:
        q = sequence()
    elif r < 0.89:
        q = geometry()
    elif r < 0.94:
        q = pick(["Prove that ", "Show that ", "Prove by induction that ", "Give a proof that ", "Can you prove that ",
                  "Demonstrate rigorously that ", "Write a formal proof that "]) + pick(PROOFS)
    else:
        q = pick(PUZZLES)
    return noisy(q + pick(REASON_SUFFIX), 0.25)


# ---------------------------------------------------------------- creative
FORMS = ["a poem", "a haiku", "a limerick", "a sonnet", "a short story", "a flash fiction piece", "song lyrics",
         "a rap verse", "a free verse poem", "a bedtime story", "a fairy tale", "a fable", "a short screenplay scene",
         "a monologue", "a ballad", "an ode", "a villanelle", "a children's rhyme", "a horror story", "a love letter",
         "a short mystery story", "a sci-fi story", "a fantasy tale", "a comedic sketch", "a diary entry from a fictional character",
         "a eulogy for a fictional character", "a toast", "a birthday poem", "a riddle", "a prose poem", "a myth",
         "an acrostic poem", "a six-word story", "a drabble (exactly 100 words)", "a country song", "a lullaby",
         "a Shakespearean sonnet", "a tanka", "a cinquain", "an epic poem", "a stand-up comedy bit", "a parody song",
         "a short play", "an opening chapter", "a villain's speech", "a motivational speech for a fictional coach"]
SUBJECTS = ["autumn leaves", "a lonely robot", "the ocean at dawn", "a cat who wants to be a dog", "first love",
            "a city at night", "my grandmother's kitchen", "a dragon afraid of fire", "coffee", "Mondays",
            "a lighthouse keeper", "the last tree on Earth", "a time traveler stuck in 1985", "friendship",
            "a lost sock", "the moon", "rain on a tin roof", "a detective who is a parrot", "space exploration",
            "a haunted library", "growing old", "a summer road trip", "a broken heart", "a tiny village in the mountains",
            "an AI that learns to dream", "a pirate who gets seasick", "winter solitude", "a bakery at 4am",
            "a sentient houseplant", "the sound of a train", "homesickness", "a superhero with a useless power",
            "a penguin in the desert", "the first day of school", "a wizard's retirement", "social media",
            "climate change", "a dog waiting for its owner", "stars", "a long-distance relationship", "my hometown",
            "the smell of books", "a forgotten toy", "a volcano that falls in love", "a dinner party gone wrong",
            "a kingdom under the sea", "procrastination", "a chess game between two old rivals", "midnight snacks",
            "a ghost who is afraid of people", "jazz", "hope", "an alien visiting a supermarket", "spring rain",
            "a knight with no horse", "a postcard never sent", "the internet going down", "a fox and a crow",
            "a retired astronaut", "the color blue", "a thunderstorm", "my cat's secret life", "mountains", "tea"]
STYLES = ["", "", "", " in the style of Dr. Seuss", " in the style of Edgar Allan Poe", " that rhymes", " with a twist ending",
          " for kids", " in a noir style", " that is funny", " that is melancholic", " in under 100 words", " in iambic pentameter",
          " from the perspective of the villain", " in Shakespearean English", " told in second person", " with a happy ending",
          " with dialogue", " in the style of a fairy tale", " that would make someone cry", " for a 7-year-old", " in 4 stanzas",
          " in the style of Hemingway", " with vivid imagery", " in a whimsical tone", " that's dark but hopeful"]
CREATE_VERBS = ["Write {f} about {s}{st}", "Compose {f} about {s}{st}", "Can you write me {f} about {s}{st}?",
                "I'd love {f} about {s}{st}", "Create {f} on the theme of {s}{st}", "Give me {f} about {s}{st}",
                "write {f} abt {s}", "Pen {f} about {s}{st}", "Make up {f} about {s}{st}", "{f} about {s}, please",
                "Write me {f} featuring {s}{st}", "Could you craft {f} inspired by {s}{st}?",
                "Escribe {f} sobre {s}", "Écris {f} sur {s}", "Schreib {f} über {s}"]
BUSINESSES = ["coffee shop", "bakery", "dog grooming salon", "fintech app", "yoga studio", "craft brewery", "bookstore",
              "tech startup", "food truck", "podcast", "YouTube channel", "plant nursery", "fitness app", "law firm",
              "wedding photography business", "vegan restaurant", "board game café", "cybersecurity company",
              "kids' coding camp", "electric bike brand", "skincare line", "travel agency", "pet food brand",
              "jazz band", "fantasy football team", "D&D campaign", "hiking club", "sci-fi novel", "indie video game",
              "charity run", "meal-kit service", "language school", "mobile game", "cleaning company"]
NAMING = ["Give me {n} name ideas for a {b}", "Suggest a catchy name for my {b}", "Brainstorm names for a {b}",
          "Write a slogan for a {b}", "Come up with a tagline for a {b}", "I need {n} creative names for a {b}",
          "Create a catchy jingle for a {b}", "Write a funny ad for a {b}", "Write {n} taglines for a {b}",
          "Invent a name and motto for a {b}", "What should I call my {b}? Give me {n} creative options",
          "Write a short, punchy marketing slogan for a {b}", "Write a product description for a {b} in a playful tone"]
JOKE_TOPICS = ["programmers", "cats", "accountants", "the weather", "coffee", "dinosaurs", "physicists", "Mondays",
               "vegetables", "pirates", "math teachers", "dentists", "penguins", "airline food", "chess players", "cheese"]
PAIRS = [("a detective", "a suspect"), ("a cat", "a dog"), ("Napoleon", "a barista"), ("two astronauts", "mission control"),
         ("a teenager", "her grandmother"), ("a robot", "its creator"), ("a customer", "a very tired waiter"),
         ("Sherlock Holmes", "a smart speaker"), ("two rival chefs", "a food critic"), ("a ghost", "a real-estate agent"),
         ("a knight", "a dragon"), ("a job applicant", "an interviewer who is a goose")]
OCCASIONS = ["my sister's wedding", "my dad's retirement", "a friend's 30th birthday", "my best friend's graduation",
             "our 10th anniversary", "a colleague's farewell party", "Mother's Day", "Valentine's Day", "a baby shower",
             "a team holiday party", "my grandmother's 90th birthday", "New Year's Eve"]


PRACTICAL = ["an email to my landlord about the broken heating", "a cover letter for a barista job", "a LinkedIn post announcing my new job",
             "an Instagram caption for a beach photo", "a short bio for my author website", "a thank-you note to my child's teacher",
             "a resignation letter that stays friendly", "a product description for handmade candles", "a wedding invitation text",
             "a farewell message to my team", "a tweet announcing our app launch", "a dating profile that sounds fun",
             "an apology text to my friend for missing her party", "a recommendation letter for my intern", "a newsletter intro for our bakery",
             "an out-of-office message that's a bit funny", "a short speech to open our school fundraiser", "a condolence card message"]
PHENOMENA = ["the moon changes shape", "cats hate water", "the sea is salty", "rainbows appear after rain", "owls stay up at night",
             "mountains have snow on top", "the sun sets in the west", "zebras have stripes", "thunder follows lightning",
             "bees buzz", "autumn leaves turn red", "the stars twinkle", "giraffes have long necks"]


def gen_creative() -> str:
    r = R.random()
    if r < 0.07:
        return noisy(pick(["Write ", "Draft ", "Help me write ", "Can you write ", "write me "]) + pick(PRACTICAL))
    if r < 0.12:
        return noisy(pick([f"Make up a {pick(['myth', 'legend', 'folk tale', 'just-so story'])} that explains why {pick(PHENOMENA)}",
                           f"Invent a legend about why {pick(PHENOMENA)}", f"Imagine {pick(SUBJECTS)} could talk. Write what it would say.",
                           f"Dream up a story about {pick(SUBJECTS)}", f"Spin a tall tale about {pick(SUBJECTS)}",
                           f"Tell me an original story about {pick(SUBJECTS)}", f"Pretend you're {pick(['a pirate', 'a Victorian poet', 'a medieval bard', 'a noir detective'])} and write about {pick(SUBJECTS)}",
                           f"Describe {pick(SUBJECTS)} as if it were {pick(['a superhero', 'a villain', 'a love interest', 'a weather report'])}"]))
    r = R.random()
    if r < 0.50:
        return noisy(pick(CREATE_VERBS).format(f=pick(FORMS), s=pick(SUBJECTS), st=pick(STYLES)))
    if r < 0.68:
        return noisy(pick(NAMING).format(n=num(3, 20), b=pick(BUSINESSES)))
    if r < 0.76:
        t = pick(JOKE_TOPICS)
        return noisy(pick([f"Tell me a joke about {t}", f"Write a joke about {t}", f"Make up a pun about {t}",
                           f"Give me {num(3, 10)} one-liners about {t}", f"Write a knock-knock joke about {t}",
                           f"Write a funny limerick about {t}", f"I need a dad joke about {t}", f"Tell me a funny story about {t}",
                           "Tell me a joke", "Make me laugh with an original joke", "Write a pun for a birthday card"]))
    if r < 0.84:
        a, b = pick(PAIRS)
        return noisy(pick([f"Write a dialogue between {a} and {b}", f"Write a short scene where {a} argues with {b}",
                           f"Write a conversation between {a} and {b} about {pick(SUBJECTS)}",
                           f"Script a funny exchange between {a} and {b}", f"Write an interview between {a} and {b}"]))
    if r < 0.92:
        o = pick(OCCASIONS)
        return noisy(pick([f"Write a toast for {o}", f"Write a short speech for {o}", f"Write a card message for {o}",
                           f"Write a poem for {o}", f"Help me write a heartfelt speech for {o}, with a bit of humour",
                           f"Write a funny rhyme for {o}"]))
    return noisy(pick([f"Invent a new {pick(['holiday', 'sport', 'board game', 'cocktail', 'superhero', 'planet', 'mythical creature', 'cuisine'])} and describe it",
                       f"Describe a fictional world where {pick(['gravity is optional', 'everyone can read minds', 'books are illegal', 'cats rule', 'it is always night'])}",
                       f"Continue this story: '{pick(['The door had been locked for a hundred years.', 'It was the last bus of the night.', 'Nobody expected the robot to cry.', 'The letter arrived a day too late.'])}'",
                       f"Write the opening line of a novel about {pick(SUBJECTS)}",
                       f"Write a plot outline for a {pick(['thriller', 'romance', 'heist movie', 'YA fantasy novel', 'sitcom episode'])} about {pick(SUBJECTS)}",
                       f"Create a character backstory for {pick(['an elf ranger', 'a retired spy', 'a space pirate', 'a small-town witch'])}",
                       f"Write a fictional news report about {pick(SUBJECTS)}", f"Write a poem titled '{pick(SUBJECTS).title()}'"]))


# ---------------------------------------------------------------- qa
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Egypt", "Norway", "Argentina", "Vietnam",
             "Mexico", "Nigeria", "Peru", "Thailand", "Poland", "Morocco", "Chile", "Finland", "Indonesia", "Turkey",
             "South Korea", "New Zealand", "Portugal", "Ethiopia", "Iceland", "Mongolia", "Colombia", "Greece",
             "Switzerland", "Ghana", "Pakistan", "Ireland", "Cuba", "Nepal", "Hungary", "Saudi Arabia", "Bolivia"]
CONCEPTS = ["photosynthesis", "inflation", "plate tectonics", "the theory of evolution", "quantum entanglement",
            "the greenhouse effect", "supply and demand", "the Doppler effect", "osmosis", "a black hole", "democracy",
            "the immune system", "general relativity", "an ecosystem", "the water cycle", "entropy", "a recession",
            "the Renaissance", "cellular respiration", "the Big Bang theory", "antibiotic resistance", "a neutron star",
            "the placebo effect", "feudalism", "the ozone layer", "cognitive dissonance", "the Industrial Revolution",
            "natural selection", "nuclear fusion", "the stock market", "a tsunami", "dark matter", "the Cold War",
            "GDP", "an eclipse", "the carbon cycle", "a hurricane", "the Enlightenment", "impressionism", "existentialism",
            "the Magna Carta", "continental drift", "CRISPR", "the circulatory system", "a monsoon", "utilitarianism",
            "the Gulf Stream", "opportunity cost", "the Silk Road", "the Pythagorean theorem", "a vaccine", "El Niño"]
HOW_WORKS = ["the internet", "a refrigerator", "a jet engine", "GPS", "the human heart", "a solar panel", "a nuclear power plant",
             "memory in the brain", "a rainbow", "a microwave oven", "an electric car battery", "the stock exchange",
             "a compass", "vaccination", "a bicycle's gears", "the kidneys", "a hydroelectric dam", "an MRI scanner",
             "the postal system", "a camera lens", "photosynthesis in plants", "a credit score", "radiocarbon dating",
             "an airplane wing", "the lungs", "3D printing", "wifi", "a submarine", "the Federal Reserve", "noise-cancelling headphones"]
WHY = ["the sky is blue", "leaves change color in autumn", "we dream", "the ocean is salty", "cats purr", "we have seasons",
       "ice floats on water", "the Roman Empire fell", "onions make you cry", "we yawn", "the Titanic sank", "birds migrate",
       "the moon has phases", "bread rises", "stars twinkle", "the Dead Sea is so salty", "we get goosebumps",
       "the Leaning Tower of Pisa leans", "the dinosaurs went extinct", "hair turns gray", "the Great Depression happened",
       "some people are left-handed", "the sea has tides", "volcanoes erupt", "we hiccup", "metal feels colder than wood",
       "zebras have stripes", "the Berlin Wall was built", "flamingos are pink", "coffee keeps you awake"]
PEOPLE = ["Marie Curie", "Nelson Mandela", "Leonardo da Vinci", "Genghis Khan", "Ada Lovelace", "Mahatma Gandhi",
          "Frida Kahlo", "Isaac Newton", "Cleopatra", "Albert Einstein", "Simón Bolívar", "Queen Victoria", "Confucius",
          "Nikola Tesla", "Joan of Arc", "Charles Darwin", "Rosa Parks", "Napoleon Bonaparte", "Mansa Musa", "Galileo Galilei",
          "Florence Nightingale", "Alexander the Great", "Wolfgang Amadeus Mozart", "Harriet Tubman", "Catherine the Great",
          "Ibn Battuta", "Rosalind Franklin", "Winston Churchill", "Sun Tzu", "Hypatia", "Martin Luther King Jr.", "Marco Polo"]
EVENTS = ["the French Revolution", "World War II", "the fall of the Berlin Wall", "the moon landing", "the Black Death",
          "the American Civil War", "the signing of the Magna Carta", "the invention of the printing press",
          "the Cuban Missile Crisis", "the collapse of the Soviet Union", "the Meiji Restoration", "the Battle of Waterloo",
          "the partition of India", "the discovery of penicillin", "the 1918 flu pandemic", "the Chernobyl disaster",
          "the construction of the Great Wall", "the Spanish Armada", "the Russian Revolution", "the Apollo 13 mission"]
BOOKS = ["Pride and Prejudice", "War and Peace", "One Hundred Years of Solitude", "1984", "The Odyssey", "Don Quixote",
         "Things Fall Apart", "The Tale of Genji", "Moby-Dick", "Crime and Punishment", "The Little Prince", "Beloved",
         "The Divine Comedy", "Hamlet", "The Origin of Species", "Frankenstein", "The Great Gatsby", "Les Misérables"]
DIFF_PAIRS = [("a virus", "a bacterium"), ("a comet", "an asteroid"), ("mitosis", "meiosis"),
              ("a crocodile", "an alligator"), ("socialism", "communism"), ("a hurricane", "a typhoon"), ("DNA", "RNA"),
              ("speed", "velocity"), ("an epidemic", "a pandemic"), ("England", "Great Britain"), ("a lake", "a pond"),
              ("a monkey", "an ape"), ("baroque", "classical music"), ("nuclear fission", "fusion"), ("a tornado", "a cyclone"),
              ("a psychologist", "a psychiatrist"), ("a republic", "a monarchy"), ("mass", "weight"), ("a herb", "a spice")]
DIFF_PAIRS += [("butter", "margarine"), ("jam", "jelly"), ("a cold", "the flu"), ("affect", "effect"), ("latitude", "longitude"),
               ("a village", "a town"), ("a violin", "a viola"), ("a star", "a planet"), ("rabbits", "hares"), ("bison", "buffalo"),
               ("sweet potatoes", "yams"), ("a bay", "a gulf"), ("HDL", "LDL cholesterol"), ("a sea", "an ocean"), ("an emperor", "a king"),
               ("who", "whom"), ("stocks", "bonds"), ("a solicitor", "a barrister"), ("sparkling wine", "champagne"), ("a moth", "a butterfly"),
               ("an igloo", "a snow cave"), ("cement", "concrete"), ("a cyclone", "an anticyclone"), ("whisky", "whiskey"), ("a duke", "a baron")]
VOCAB = ["ubiquitous", "serendipity", "sonder", "hubris", "ephemeral", "laconic", "schadenfreude", "zeitgeist",
         "quixotic", "petrichor", "entropy", "hegemony", "meme", "renaissance", "diaspora", "oligarchy", "placebo",
         "irony", "nostalgia", "paradigm", "sovereignty", "metaphor", "photosphere", "allele", "biome", "tariff"]
FACT_QS = [
    "How many planets are in the solar system?", "What is the speed of light?", "How tall is Mount Everest?",
    "What is the largest ocean on Earth?", "What is the chemical formula for table salt?", "How many continents are there?",
    "Who painted the Mona Lisa?", "What is the hardest natural substance?", "How long does light from the Sun take to reach Earth?",
    "What is the smallest country in the world?", "How many hearts does an octopus have?", "What is the freezing point of water in Fahrenheit?",
    "Which element has the atomic number 1?", "How many people live in Tokyo?", "What is the longest river in the world?",
    "When did the first humans arrive in the Americas?", "What is the most spoken language in the world?",
    "How deep is the Mariana Trench?", "What's the largest planet in our solar system?", "How many chromosomes do humans have?",
    "Who was the first president of the United States?", "What year did the Titanic sink?", "What is the capital of Canada?",
    "Which country has the most time zones?", "What is the largest mammal?", "How old are the pyramids of Giza?",
    "Who discovered gravity?", "What is the boiling point of water at sea level?", "How many bones does a baby have?",
    "Which blood type is the universal donor?", "What's the hottest planet in the solar system?", "What is a light-year?",
    "How many strings does a violin have?", "What does the mitochondria do?", "Who invented the light bulb?",
    "What is the rarest blood type?", "When was the Eiffel Tower built?", "How many languages are spoken in India?",
    "What is the largest country by area?", "What causes earthquakes?", "What is the tallest building in the world?",
    "How long is a day on Mars?", "What is the national animal of Scotland?", "Who wrote the theory of relativity?",
    "Which vitamin do we get from sunlight?", "How many teeth does an adult human have?", "What are the noble gases?",
    "Who built Machu Picchu?", "What is the driest place on Earth?", "How fast can a cheetah run?",
    "What does a sommelier do?", "How is glass made?", "Which is the oldest university in the world?",
    "What was the Ottoman Empire?", "What is the Fibonacci sequence?", "What is the Kuiper belt?",
    "How many Olympic gold medals has Michael Phelps won?", "What's the population of Nigeria?",
    "What is the main ingredient in guacamole?", "What's the origin of the word 'robot'?", "What do pandas eat?",
    "How are diamonds formed?", "What is absolute zero?", "Which country invented paper?", "What is the UN Security Council?",
    "What is the largest coral reef system?", "How do vaccines get approved?", "What is the capital of Mongolia?",
    "Who was the last emperor of China?", "What is the difference between an atom and a molecule?",
    "Quelle est la plus haute montagne d'Europe ?", "¿Quién pintó Las Meninas?", "Wie viele Einwohner hat Deutschland?",
    "Chi ha scritto la Divina Commedia?", "Qual é a capital da Austrália?", "日本で一番高い山は何ですか？",
    "中国的首都是哪里？", "Кто написал «Войну и мир»?", "Wat is de hoofdstad van België?", "Ile lat ma Wszechświat?",
]


QA_NATIVE = [
    "¿Cuál es la capital de {es}?", "¿Quién escribió Cien años de soledad?", "¿Por qué el cielo es azul?", "¿Cuántos huesos tiene el cuerpo humano?",
    "¿Qué es la fotosíntesis?", "¿Cuándo terminó la Segunda Guerra Mundial?", "¿Cuál es el planeta más grande del sistema solar?",
    "Quelle est la capitale de {fr} ?", "Qui a inventé le téléphone ?", "Pourquoi les feuilles tombent-elles en automne ?",
    "Combien d'habitants compte la France ?", "Qu'est-ce qu'un trou noir ?", "Quand a eu lieu la Révolution française ?",
    "Was ist die Hauptstadt von {de}?", "Wer hat das Penicillin entdeckt?", "Warum ist das Meer salzig?", "Wie hoch ist die Zugspitze?",
    "Was ist Photosynthese?", "Wann fiel die Berliner Mauer?", "Wie funktioniert ein Elektromotor?",
    "Qual è la capitale del {it}?", "Chi ha dipinto la Gioconda?", "Perché il cielo è blu?", "Quando è nato Galileo?",
    "Qual é a capital do {pt}?", "Quem descobriu o Brasil?", "Por que o mar é salgado?", "O que é um vulcão?",
    "富士山の高さは何メートルですか？", "光の速さはどれくらいですか？", "万里长城有多长？", "地球上最大的海洋是哪个？",
    "Какая самая длинная река в мире?", "Почему небо голубое?", "Wat is de grootste planeet?", "Vad är Sveriges huvudstad?",
]
QA_NATIVE_COUNTRIES = {"es": ["Japón", "Alemania", "Perú", "Canadá", "Egipto"], "fr": ["l'Australie", "la Norvège", "l'Inde", "le Brésil"],
                       "de": ["Kanada", "Japan", "Peru", "Ägypten"], "it": ["Giappone", "Canada", "Perù"], "pt": ["Japão", "Canadá", "Egito"]}


QA_FOREIGN_TEMPLATES = {
    "es": (["¿Qué es {c}?", "¿Cómo funciona {c}?", "¿Por qué es importante {c}?", "Explícame {c}", "¿Quién fue {p}?", "¿Dónde nació {p}?"],
           ["la fotosíntesis", "la inflación", "un agujero negro", "la democracia", "el efecto invernadero", "la gravedad", "un volcán",
            "la evolución", "el sistema inmunológico", "la energía nuclear", "un terremoto", "la Revolución Industrial"]),
    "fr": (["Qu'est-ce que {c} ?", "Comment fonctionne {c} ?", "Explique-moi {c}", "Qui était {p} ?", "Pourquoi {c} est-il important ?"],
           ["la photosynthèse", "l'inflation", "un trou noir", "la démocratie", "l'effet de serre", "la gravité", "un volcan",
            "l'évolution", "le système immunitaire", "l'énergie nucléaire", "un séisme", "la Renaissance"]),
    "de": (["Was ist {c}?", "Wie funktioniert {c}?", "Erkläre mir {c}", "Wer war {p}?", "Warum ist {c} wichtig?"],
           ["die Photosynthese", "Inflation", "ein schwarzes Loch", "die Demokratie", "der Treibhauseffekt", "die Schwerkraft",
            "ein Vulkan", "die Evolution", "das Immunsystem", "die Kernenergie", "ein Erdbeben", "die Reformation"]),
    "it": (["Che cos'è {c}?", "Come funziona {c}?", "Chi era {p}?", "Spiegami {c}"],
           ["la fotosintesi", "l'inflazione", "un buco nero", "la democrazia", "l'effetto serra", "la gravità", "un vulcano"]),
    "pt": (["O que é {c}?", "Como funciona {c}?", "Quem foi {p}?", "Explique {c}"],
           ["a fotossíntese", "a inflação", "um buraco negro", "a democracia", "o efeito estufa", "a gravidade", "um vulcão"]),
}


ANIMALS = ["elephants", "octopuses", "honeybees", "penguins", "wolves", "sharks", "koalas", "owls", "dolphins", "tigers",
           "tortoises", "bats", "salmon", "camels", "ants", "giraffes", "crows", "jellyfish", "polar bears", "hummingbirds"]
DISEASES = ["malaria", "diabetes", "measles", "tuberculosis", "asthma", "the flu", "Lyme disease", "anemia", "migraine", "scurvy",
            "cholera", "Alzheimer's disease", "chickenpox", "celiac disease", "glaucoma"]
FIRMS = ["Microsoft", "Apple", "Google", "Amazon", "IBM", "Toyota", "Samsung", "Nintendo", "IKEA", "Nokia", "Coca-Cola", "Lego",
         "Sony", "Volkswagen", "Netflix", "Tesla"]
SPORTS = ["basketball", "cricket", "rugby", "ice hockey", "volleyball", "baseball", "handball", "water polo", "curling", "lacrosse"]
LANDMARKS = ["the Eiffel Tower", "the Colosseum", "the Taj Mahal", "the Golden Gate Bridge", "Big Ben", "the Statue of Liberty",
             "Machu Picchu", "Angkor Wat", "the Sydney Opera House", "Petra", "Stonehenge", "the Burj Khalifa"]
BODIES = ["Jupiter", "Saturn", "Venus", "Mercury", "Neptune", "the Moon", "Europa", "Titan", "the Sun", "Pluto", "Halley's Comet"]
FOODS = ["chocolate", "coffee", "tofu", "sushi", "pasta", "tea", "cheese", "quinoa", "vanilla", "potatoes", "kimchi", "bagels"]


ACRONYMS = ["NASA", "UNESCO", "NATO", "RNA", "GDP", "the WHO", "LASER", "SCUBA", "RADAR", "FIFA", "OPEC", "UNICEF", "ESA",
            "the IMF", "MRI", "BCE", "PhD", "the EU", "CERN", "AM and PM", "SONAR", "the ISS"]


def qa_domains() -> str:
    a, d, f = pick(ANIMALS), pick(DISEASES), pick(FIRMS)
    return pick([f"What does {pick(ACRONYMS)} stand for?", f"What does {pick(ACRONYMS)} stand for and what does it do?",
                 f"What is {pick(ACRONYMS)} short for?", f"How long do {a} live?", f"What do {a} eat?", f"Where do {a} live?", f"Are {a} endangered?", f"How do {a} sleep?",
                 f"What are the symptoms of {d}?", f"What causes {d}?", f"How is {d} treated?", f"Is {d} contagious?",
                 f"Who founded {f}?", f"When was {f} founded?", f"Where is {f} headquartered?", f"What was {f}'s first product?",
                 f"How many players are on a {pick(SPORTS)} team?", f"What are the basic rules of {pick(SPORTS)}?",
                 f"Where did {pick(SPORTS)} originate?", f"How tall is {pick(LANDMARKS)}?", f"When was {pick(LANDMARKS)} built?",
                 f"Who built {pick(LANDMARKS)}?", f"How big is {pick(BODIES)}?", f"How far is {pick(BODIES)} from the Sun?",
                 f"Does {pick(BODIES)} have an atmosphere?", f"Where does {pick(FOODS)} come from?", f"What is {pick(FOODS)} made of?",
                 f"What's the history of {pick(FOODS)}?"])


def gen_qa() -> str:
    r = R.random()
    if r < 0.15:
        return noisy(qa_domains(), 0.25)
    r = R.random()
    if r < 0.05:
        return pick(QA_NATIVE).format(**{k: pick(v) for k, v in QA_NATIVE_COUNTRIES.items()})
    if r < 0.10:
        templates, concepts = QA_FOREIGN_TEMPLATES[pick(list(QA_FOREIGN_TEMPLATES))]
        return pick(templates).format(c=pick(concepts), p=pick(PEOPLE))
    if r < 0.15:
        # Factual explanations asked "step by step" or "in detail" are still qa, not reasoning.
        x = pick(CONCEPTS + HOW_WORKS)
        return noisy(pick([f"Explain {x} step by step", f"Walk me through how {x} works, step by step", f"Explain {x} in detail",
                           f"Can you explain {x} like I'm five?", f"Break down {x} for a beginner", f"Give me a detailed explanation of {x}"]))
    r = R.random()
    c = pick(COUNTRIES)
    if r < 0.28:
        q = pick(FACT_QS)
    elif r < 0.40:
        q = pick([f"What is the capital of {c}?", f"What currency is used in {c}?", f"What language do people speak in {c}?",
                  f"How many people live in {c}?", f"Which countries border {c}?", f"What is the highest mountain in {c}?",
                  f"When did {c} become independent?", f"What is {c} famous for?", f"What's the climate like in {c}?",
                  f"What type of government does {c} have?", f"What is the national dish of {c}?", f"Where is {c} located?",
                  f"What is the largest city in {c}?", f"What are the main exports of {c}?"])
    elif r < 0.55:
        x = pick(CONCEPTS)
        q = pick([f"What is {x}?", f"Explain {x}", f"Can you explain {x} in simple terms?", f"What does {x} mean?",
                  f"Define {x}", f"Give me a short explanation of {x}", f"What causes {x}?", f"Why is {x} important?",
                  f"How would you describe {x} to a high school student?", f"What are the main ideas behind {x}?"])
    elif r < 0.64:
        q = pick([f"How does {pick(HOW_WORKS)} work?", f"How do {pick(['bees', 'birds', 'plants', 'bats', 'whales', 'ants'])} {pick(['communicate', 'navigate', 'sleep', 'reproduce'])}?",
                  f"What's the science behind {pick(HOW_WORKS)}?", f"Explain how {pick(HOW_WORKS)} works"])
    elif r < 0.73:
        q = pick([f"Why {pick(WHY)}?", f"Why is it that {pick(WHY)}?", f"What is the reason {pick(WHY)}?"])
        q = q.replace("Why the", "Why is the") if q.startswith("Why the sky") else q
    elif r < 0.82:
        p = pick(PEOPLE)
        q = pick([f"Who was {p}?", f"What is {p} known for?", f"When did {p} live?", f"What did {p} discover or achieve?",
                  f"Tell me about {p}", f"Where was {p} born?", f"How did {p} die?", f"Why is {p} famous?"])
    elif r < 0.89:
        e = pick(EVENTS)
        q = pick([f"When did {e} happen?", f"What caused {e}?", f"What were the consequences of {e}?", f"Explain {e}",
                  f"Who was involved in {e}?", f"Give me a brief history of {e}", f"Why did {e} matter?"])
    elif r < 0.93:
        b = pick(BOOKS)
        q = pick([f"Who wrote {b}?", f"When was {b} published?", f"What is {b} about?", f"What genre is {b}?"])
    elif r < 0.98:
        a, b = pick(DIFF_PAIRS)
        q = pick([f"What's the difference between {a} and {b}?", f"How is {a} different from {b}?", f"{a} vs {b}: what's the difference?"])
    else:
        w = pick(VOCAB)
        q = pick([f"What does the word '{w}' mean?", f"Define '{w}'", f"What is the origin of the word {w}?", f"meaning of {w}"])
    return noisy(q, 0.3)


# ---------------------------------------------------------------- chat
GREETINGS = ["hi", "hello", "hey", "hey!", "hi there", "hello!", "yo", "sup", "heya", "good morning", "good afternoon",
             "good evening", "morning!", "hiya", "howdy", "hey hey", "hi :)", "hello again", "hey, how are you?",
             "how are you doing?", "how's it going?", "what's up?", "how are you today?", "hi, nice to meet you",
             "thanks", "thank you", "thanks a lot!", "thank you so much", "ty", "thx", "cheers", "much appreciated",
             "ok", "okay", "ok thanks", "cool", "nice", "great", "awesome", "perfect", "got it", "makes sense",
             "lol", "haha", "lmao", "😂", "👍", "🙂", "❤️", "wow", "oh nice", "no worries", "sure", "yes", "no", "maybe",
             "bye", "goodbye", "see you", "see ya later", "good night", "gn", "ttyl", "I'm back", "are you there?",
             "you there?", "nevermind", "never mind", "oops", "sorry", "my bad", "hmm", "interesting", "really?",
             "that's funny", "you're funny", "you're the best", "I love you", "you're smart", "good bot", "bad answer",
             "that's not what I asked", "can you repeat that?", "what?", "huh", "k", "hello?", "hey buddy", "hey friend"]
FOREIGN_CHAT = ["hola", "hola, ¿qué tal?", "buenos días", "gracias!", "bonjour", "salut, ça va ?", "merci beaucoup",
                "bonne nuit", "hallo", "guten Morgen!", "danke schön", "wie geht es dir?", "ciao!", "grazie mille",
                "olá, tudo bem?", "obrigado!", "こんにちは", "おはよう！", "ありがとう", "你好", "谢谢！", "你好吗？",
                "привет!", "спасибо", "안녕하세요", "고마워요", "merhaba", "hej, hur mår du?", "cześć!", "hoi, alles goed?",
                "Estoy aburrido, ¿hablamos un rato?", "Je suis un peu triste aujourd'hui.", "Ich bin heute so müde.",
                "Che tempo fa da te?", "Estou com saudades de casa.", "今日は疲れた…", "我今天心情不好。", "Мне скучно, поболтаем?",
                "¿Qué me recomiendas hacer este fin de semana?", "Tu as passé une bonne journée ?", "Was machst du gerade?",
                "Ti piace la musica?", "Me siento solo últimamente.", "J'ai réussi mon examen !!", "Ich habe heute Geburtstag!"]
FEELINGS = ["stressed", "anxious", "lonely", "sad", "overwhelmed", "happy", "excited", "bored", "tired", "nervous",
            "frustrated", "burned out", "heartbroken", "unmotivated", "proud", "confused", "grateful", "homesick", "angry", "lost"]
REASONS = ["about work", "because of my exams", "since my breakup", "after moving to a new city", "and I don't know why",
           "because my friend ignored me", "about my future", "because it's my birthday", "after a long week",
           "because my dog is sick", "about money", "since I started my new job", "about my relationship",
           "because I finally finished my project", "about the holidays", "because my parents are fighting",
           "after getting rejected from a job", "because I can't sleep", "about turning 30", "today"]
ADVICE = ["make friends in a new city", "stop procrastinating", "be more confident", "get over a breakup",
          "deal with a difficult coworker", "stay motivated to work out", "stop overthinking", "sleep better",
          "handle stress at work", "talk to my parents about moving out", "ask my boss for a raise",
          "get out of a creative rut", "be less shy at parties", "support a friend who is grieving",
          "balance work and family", "keep a long-distance relationship going", "say no without feeling guilty",
          "deal with loneliness", "stop checking my phone all the time", "motivate myself on Mondays",
          "cope with homesickness", "prepare mentally for a big exam", "reconnect with an old friend",
          "handle criticism better", "stay calm during arguments"]
DECISIONS = ["quit my job", "move abroad", "get a cat", "go back to school", "break up with my partner", "buy a house",
             "start my own business", "learn the piano at 40", "confront my roommate", "go to my ex's wedding",
             "take a gap year", "tell my friend how I feel", "switch careers", "move back in with my parents",
             "dye my hair blue", "go on a solo trip", "take the job offer in another city", "lend money to my brother"]
OPINION = ["pineapple on pizza", "remote work", "cats vs dogs", "summer or winter", "the best season", "morning people",
           "social media", "tea or coffee", "superhero movies", "reality TV", "camping", "video games", "jazz",
           "the beach vs the mountains", "working out in the morning", "reading on a kindle", "breakfast for dinner"]
REC = ["a movie to watch tonight", "a book for the beach", "a TV show like The Office", "a podcast for my commute",
       "a video game to play with friends", "some music for studying", "a hobby I can do at home", "a gift for my mom",
       "something fun to do this weekend", "a date idea", "a board game for a party", "an anime for beginners",
       "a good comfort movie", "a novel like The Hobbit", "a song to cheer me up", "snacks for a movie night"]
ABOUT_BOT = ["are you a robot?", "are you human?", "what's your name?", "who made you?", "do you have feelings?",
             "can you remember our last conversation?", "what can you do?", "do you sleep?", "how old are you?",
             "are you sentient?", "do you like talking to people?", "what do you do for fun?", "are you my friend?",
             "what's your favorite color?", "do you get tired of questions?", "can I tell you a secret?"]
LIFE_NEWS = ["I just got engaged!", "I passed my driving test!!", "My cat had kittens", "I got the job!!!",
             "I finally ran 5k without stopping", "my sister had a baby today", "I'm moving to Berlin next month",
             "I broke my leg skiing", "my laptop died and I lost everything", "I got dumped yesterday",
             "it's my first day at a new job", "we adopted a puppy", "I finished my thesis!", "I'm graduating tomorrow",
             "my grandpa passed away last week", "I started learning guitar", "I burned dinner again lol"]


HABITS = ["biting my nails", "doomscrolling at night", "procrastinating on everything", "saying yes to everyone",
          "overthinking every text I send", "eating junk food when I'm stressed", "snoozing my alarm", "feeling jealous of my friends",
          "apologizing all the time", "staying up until 3am", "checking my ex's profile", "spending money I don't have"]
PERSONAL = ["get over my fear of flying", "move on from my ex", "tell my parents I'm dropping out", "get my roommate to clean up",
            "find my passion", "be happier", "relax after work", "stop worrying about what people think of me",
            "deal with a friend who always cancels plans", "make small talk at parties", "forgive my sister",
            "get through a breakup", "feel less awkward on dates", "survive a long week", "be a better listener",
            "cope with a bad day", "handle being ghosted", "stay positive when job hunting"]
MORE_FOREIGN_CHAT = ["最近どう？", "元気にしてる？", "お疲れ様です！", "おやすみなさい", "暇だなあ", "你在干嘛？", "晚安", "好无聊啊",
                     "今天过得怎么样？", "잘 지내?", "뭐 해?", "Как ты?", "Что делаешь?", "Hoe gaat het met je?", "Hur är läget?",
                     "Jak się masz?", "Nasılsın?", "Tudo bem contigo?", "Come va?", "Ça roule ?", "¿Qué haces?", "Wie war dein Tag?",
                     "Je m'ennuie, on discute ?", "Me siento un poco triste hoy", "Ich vermisse meine Familie", "Sono così stanco oggi",
                     "Estou tão feliz hoje!", "Merci pour ton aide !", "¡Muchas gracias, eres genial!", "Danke, du bist super!"]


def gen_chat() -> str:
    r = R.random()
    if r < 0.12:
        return noisy(pick([f"I keep {pick(HABITS)}. How do I stop?", f"How do I stop {pick(HABITS)}?", f"how can I {pick(PERSONAL)}?",
                           f"How do I {pick(PERSONAL)}?", f"any advice on how to {pick(PERSONAL)}?", f"I don't know how to {pick(PERSONAL)}",
                           f"What would you do to {pick(PERSONAL)}?", f"I've been {pick(HABITS)} a lot lately, is that bad?"]), 0.15)
    if r < 0.18:
        return pick(MORE_FOREIGN_CHAT)
    r = R.random()
    if r < 0.22:
        g = pick(GREETINGS)
        g = g.rstrip("?!.") or g if maybe(0.3) else g
        return g.capitalize() if maybe(0.4) else g
    if r < 0.32:
        return pick(FOREIGN_CHAT)
    if r < 0.46:
        f = pick(FEELINGS)
        return noisy(pick([f"I'm feeling {f} {pick(REASONS)}", f"I feel so {f} {pick(REASONS)}", f"feeling {f} {pick(REASONS)} tbh",
                           f"I've been really {f} lately. {pick(['Any advice?', 'Can we talk?', 'What should I do?', '', 'Just needed to say it.'])}",
                           f"Honestly I'm {f} {pick(REASONS)}, can you cheer me up?", f"ugh, so {f} today"]), 0.15)
    if r < 0.60:
        return noisy(pick([f"How can I {pick(ADVICE)}?", f"Any tips to {pick(ADVICE)}?", f"I need advice: how do I {pick(ADVICE)}?",
                           f"What's the best way to {pick(ADVICE)}?", f"Can you help me {pick(ADVICE)}?",
                           f"Should I {pick(DECISIONS)}?", f"I'm thinking about whether to {pick(DECISIONS)}. What do you think?",
                           f"Would it be crazy to {pick(DECISIONS)}?", f"Help me decide if I should {pick(DECISIONS)}"]), 0.2)
    if r < 0.70:
        o = pick(OPINION)
        return noisy(pick([f"What do you think about {o}?", f"Thoughts on {o}?", f"What's your opinion on {o}?",
                           f"Do you like {o}?", f"Be honest, {o}: yes or no?", f"Which do you prefer: {o}?",
                           f"What's your favorite {pick(['movie', 'book', 'food', 'song', 'animal', 'holiday', 'city', 'band'])}?"]))
    if r < 0.80:
        return noisy(pick([f"Can you recommend {pick(REC)}?", f"Recommend me {pick(REC)}", f"Any suggestions for {pick(REC)}?",
                           f"I need {pick(REC)}, any ideas?", f"What should I {pick(['eat', 'do', 'watch', 'cook', 'read'])} {pick(['tonight', 'this weekend', 'today', 'now'])}?",
                           "I'm bored, entertain me", "Let's just chat", "Tell me something fun", "Talk to me", "Can we chat for a bit?",
                           "Tell me about your day", "Say something nice", "What should we talk about?"]))
    if r < 0.88:
        return noisy(pick(ABOUT_BOT), 0.1)
    n = pick(LIFE_NEWS)
    return pick([n, f"{n} {pick(['🎉', '😭', '😅', '', 'just wanted to tell someone', 'what do I do now?', 'so happy', 'feeling weird about it'])}"])


# ---------------------------------------------------------------- hand-written natural examples
NATURAL: dict[str, list[str]] = {
    "code": [
        "why does my python script say list index out of range",
        "my docker container exits immediately after starting, the logs are empty. Dockerfile: FROM alpine\nCMD echo hi",
        "what's a good way to structure a large express.js project?",
        "write me a simple todo app in react with add and delete",
        "turn this into a one-liner: total = 0\nfor x in nums:\n    if x > 0:\n        total += x",
        "help me center text in css",
        "what does `set -euo pipefail` do at the top of a bash script?",
        "regex for a US phone number",
        "How can I speed up my pandas groupby on 50M rows?",
        "Write a SQL query: customers who ordered in January but not in February",
        "difference between a left join and a right join",
        "my React state doesn't update immediately after setState, why?",
        "How do I delete a remote branch in git?",
        "Create a Python dataclass for an invoice with line items and a total property",
        "write a kubernetes cronjob that runs every 5 minutes",
        "npm install keeps failing with EACCES permission denied",
        "can you explain what a lambda function is in python with an example",
        "Convert this Java to Kotlin: public class Point { private int x; public int getX() { return x; } }",
        "Optimize this SQL: SELECT * FROM logs WHERE DATE(created_at) = '2024-01-01'",
        "What does this bash do? find . -name '*.pyc' -delete",
        "I want to learn Rust, can you show me how to read a file and count lines?",
        "Write a recursive function to compute factorial in C",
        "Generate a .env loader in Go that falls back to defaults",
        "what is the big-O of this? for i in range(n):\n  for j in range(i):\n    pass",
        "Write a Python decorator that times a function",
        "Explain the output of: print([i for i in range(10) if i % 3 == 0])",
        "Implement a stack using two queues in Java",
        "how do i install a specific version of a package with pip",
        "the following jest test fails randomly, why? test('x', async () => { setTimeout(() => expect(1).toBe(2), 10) })",
        "Set up a basic FastAPI app with one GET endpoint returning JSON",
        "Can you write a vim command to delete all lines containing 'DEBUG'?",
        "Write a Dockerfile multi-stage build for a Go binary",
        "code review: is it okay to catch Exception everywhere in my Java service?",
        "how do I write a for loop in bash that counts from 1 to 10",
        "write an html form with name, email and a submit button",
        "What's wrong with my makefile? all: main.o\n gcc -o app main.o   (it says missing separator)",
        "translate this javascript to python: const xs = arr.filter(x => x > 2).map(x => x * 10);",
        "write a program that prints the multiplication table up to 12",
        "how do I connect to a mysql database from node",
        "What is the difference between `git fetch` and `git pull`?",
    ],
    "reasoning": [
        "what's 15 times 24", "If a pizza is cut into 8 slices and I eat 3, what percentage is left?",
        "I have 3 shirts and 4 pants, how many outfits can I make?", "Is 1 a prime number? Why or why not?",
        "A number doubled and then increased by 7 gives 31. What is the number?",
        "Which is bigger: 3/7 or 5/12?", "How many seconds are in a week? Show the calculation.",
        "If the train is going 80 mph, how long to go 200 miles?", "Solve 2^(x+1) = 32",
        "My salary is $4,200 a month and I spend 35% on rent. How much is left after rent?",
        "A square has an area of 49. What's its perimeter?", "What is 7 factorial?",
        "If every cat has 4 legs and I count 36 legs among cats and birds with 12 animals, how many birds?",
        "Is the number 1001 divisible by 7?", "What's the angle between clock hands at 9:45?",
        "Three people split a $84 bill with a 15% tip. How much each?", "Find x: x/4 + 3 = 11",
        "If I flip a coin 3 times, what's the chance of getting heads every time?",
        "what is the square root of 144 times 3", "Prove that 0.999... equals 1",
        "How many handshakes happen if 10 people each shake hands once with everyone else?",
        "There are 5 red and 3 green apples; I pick 2 at random. What's the chance they're different colors?",
        "Sort these fractions from smallest to largest: 2/3, 5/8, 3/5, 7/10",
        "What's 2 + 2 * 2?", "A runner completes 400m laps in 90 seconds. What's her pace per km?",
        "Logic question: if no fish are mammals and all whales are mammals, can a whale be a fish?",
        "Simplify the expression 3(x + 4) - 2(x - 1)", "What is 1/3 + 1/4?",
        "I need to pack 137 eggs into cartons of 12. How many cartons and how many eggs left over?",
        "A savings account grows from $1000 to $1210 in two years. What's the annual interest rate?",
        "If the hour hand moves 0.5 degrees per minute, how far does it move in 2 hours 20 minutes?",
        "How many prime numbers are there between 1 and 50?", "calculate 12.5% of 640",
        "What is the determinant of a 2x2 matrix [[4, 7], [2, 6]]?", "Convert 98.6°F to Celsius, show the formula",
    ],
    "creative": [
        "write a poem", "tell me a story", "Write a haiku about my cat sleeping in the sun",
        "Can you write a funny poem about my friend Jake who's always late?",
        "write a short story where the main character is a cloud",
        "Give me ideas for a name for my fantasy novel's villain",
        "write lyrics for a pop song about summer love", "Write a limerick about a programmer and a bug",
        "make up a bedtime story about a unicorn who loves pizza", "Invent a cocktail name for a space-themed party",
        "Write a short poem for my mom's birthday card", "Write a creepy two-sentence horror story",
        "Come up with a slogan for our school's recycling campaign", "Write a rap about photosynthesis",
        "Write a dramatic monologue for a toaster that's about to be thrown away",
        "Create a name for my new puppy, she's fluffy and white", "Write a romantic poem in French about Paris",
        "Write a story about a time traveler who visits ancient Rome, 500 words",
        "write something poetic about losing a friend", "Give me a catchy title for my blog about budget travel",
        "write a speech for my character, a queen going to war, in a fantasy setting",
        "Write a short sci-fi story about first contact told from the alien's perspective",
        "Write a limerick in Spanish about a lazy cat", "Create a D&D tavern with a name, owner and a rumor",
        "Write an haiku sequence about the four seasons", "write a silly song about brushing teeth for my toddler",
        "Write a poem where every line starts with the next letter of the alphabet",
        "Write a letter from Santa to a kid who wants a dinosaur",
    ],
    "summarization": [
        "summarize this: The quarterly report shows revenue grew 12% while costs stayed flat. The board approved a new dividend and plans to expand into two new markets next year. Hiring will slow in the second half.",
        "Can you sum up this paragraph? Bees are essential pollinators. Without them many crops would fail. Pesticides, habitat loss and disease have caused colonies to decline across Europe and North America.",
        "tldr: our landlord says the building will be renovated starting in May, water will be shut off on weekdays from 9 to 5 for about three weeks, and tenants can use the gym showers in the meantime. Parking will also be closed for the first week.",
        "Give me a 1-sentence summary: The new policy allows employees to carry over up to five unused vacation days into the next year, but those days must be used by the end of March or they will be lost.",
        "Summarize what he's saying: honestly the project is fine but we keep changing the requirements every two weeks and the designers never talk to the engineers, so we redo the same screens over and over, and then everyone wonders why we're late.",
        "Please summarize the following chapter for my book club notes.\n\nIn chapter three, Elena returns to her hometown after the funeral. She finds her brother has sold the family bakery without telling her. They argue bitterly, and she decides to stay in town for the summer to find out why he needed the money.",
        "short summary of this article please: Scientists have discovered a new species of deep-sea octopus off the coast of Costa Rica. The octopus, which lives near hydrothermal vents, broods its eggs in warm water, which speeds up their development.",
        "Summarize my notes from the lecture: - mitochondria = powerhouse - ATP made via oxidative phosphorylation - electron transport chain in inner membrane - oxygen final electron acceptor - cyanide blocks complex IV",
    ],
    "translation": [
        "translate hello to spanish", "how do you say thank you in japanese", "what is 'dog' in german",
        "French for 'I miss you'?", "Translate 'where is the bathroom' into Italian",
        "can you translate this to english: je suis fatigué", "how do I say good morning in korean",
        "Translate my tweet into Spanish: so excited for the weekend, beach here I come!",
        "Say 'happy new year' in Chinese", "how to say 'cheers' in Russian",
        "Translate this to German please: The invoice is attached. Payment is due within 30 days.",
        "What does 'Wie geht es Ihnen?' mean in English?", "translate 'on my way' to portuguese",
        "How do you write 'I love you mom' in Arabic?", "Translate 'break a leg' into French, idiomatically",
    ],
    "extraction": [
        "extract the dates: the contract starts on March 3, 2024 and ends on March 2, 2025, with a review on Sept 1.",
        "Is this review positive or negative: 'the food was cold and the waiter ignored us'",
        "Get all the names from this: Anna met Tom and Luis at the station, then they called Priya.",
        "classify: 'my internet has been down since yesterday' -> billing, technical or sales?",
        "Pull the price and the product out of: 'Selling my used iPhone 12, 128GB, for $350 or best offer'",
        "Extract the city and date from: Conference in Vienna on 12 October 2025",
        "What's the sentiment of 'meh, it was fine I guess'?",
        "sentiment of this tweet: 'best day ever!!!'",
        "Return JSON {name, age, city} from: 'Hi, I'm Sara, 29, living in Porto.'",
        "Find every URL in this text: check https://example.com and http://foo.org/docs for details",
        "Classify these emails as urgent or not urgent: 1) Server is down! 2) Lunch menu for Friday 3) Invoice overdue by 60 days",
        "Which language is this: 'Dziękuję za wszystko'?",
        "is this spam: 'You won a cruise! Call now to claim your prize'",
        "Extract the ingredients from: mix 2 eggs, 200g of flour, a cup of milk and a pinch of salt",
        "label the topic of this question: 'how do I reset my router?' (tech, cooking, finance, travel)",
    ],
    "qa": [
        "who invented the internet", "what is the capital of australia", "how many moons does mars have",
        "when did ww2 end", "why do we have fingerprints?", "What's the tallest animal?", "how far away is the sun",
        "what is a black hole", "What is the population of Earth?", "Who discovered America?",
        "How long do elephants live?", "what does a cardiologist do", "Is a tomato a fruit or a vegetable?",
        "What's the biggest volcano in the solar system?", "How do earthquakes happen?", "Who was Julius Caesar?",
        "What is the meaning of the word 'sonder'?", "Which countries use the euro?", "What are the primary colors?",
        "What is the speed of sound?", "How many players are on a soccer team?", "What is the Mona Lisa?",
        "Why is the ocean blue?", "When was the internet invented?", "What is stoicism?",
    ],
    "chat": [
        "hi!", "hello", "thanks!", "thank you!", "ok", "good morning", "how are you?", "lol", "bye!", "great, thanks",
        "nice", "cool thanks", "you're welcome", "I'm so tired today", "ugh mondays", "I'm bored",
        "can we talk?", "I miss my friends", "guess what, I got a promotion!", "my boyfriend forgot our anniversary",
        "what's your favorite food?", "do you like music?", "I'm nervous about tomorrow", "I need some motivation",
        "how's your day going?", "what are you doing?", "sorry for the late reply", "that makes me sad",
        "I can't decide what to have for lunch", "any fun plans for the weekend?", "yay!", "awesome!!",
        "I'm so happy right now", "my exam went terribly", "just checking in", "I feel like nobody understands me",
        "What should I name my goldfish? jk, just tell me about your day",
        "I've been feeling burned out at work, how do people deal with this?",
        "do you think I should call my dad? we haven't talked in months",
    ],
}


# ---------------------------------------------------------------- mixed hard cases
def gen_hard(label: str) -> str:
    """Prompts whose surface words point at another label, so the instruction must win."""
    L = pick(LANGS)
    if label == "code":
        return pick([f"Translate this Python to {pick(PLANGS)}:\n{pick(SNIPPETS)}",
                     "Write a Python function that solves quadratic equations",
                     f"Write code to compute the probability of {pick(['two dice summing to 7', 'a royal flush', 'three heads in a row'])} by simulation",
                     f"Write a script that translates text to {L} using an API", "Write a function that summarizes a list of numbers (mean, median, max)",
                     "Write a regex to extract all dates from a document", "Write a Python script that extracts emails from a text file",
                     "Implement sentiment analysis in Python with scikit-learn", f"Write a poem generator in {pick(PLANGS)}",
                     f"Write a {pick(PLANGS)} program to check if a number is prime", "Write code that prints the first 100 Fibonacci numbers",
                     f"{long_code()}\n\nfix the bug", f"{long_code()}\n\nwhat does this code do?", f"Explain this code:\n{long_code()}",
                     "Write a SQL query that summarizes sales by month", f"How do I translate my Django app into {L}? (i18n setup)",
                     f"Summarize what this function does:\n{pick(SNIPPETS)}", "Build a chatbot in Python that says hello"])
    if label == "reasoning":
        return pick([f"A translator charges ${num(10, 30)} per page and translates {num(5, 12)} pages a day. How much does a {num(50, 300)}-page book cost and how long will it take?",
                     f"A poem has {num(3, 8)} stanzas of {num(4, 6)} lines, each with {num(6, 10)} words. How many words in total?",
                     f"If a program runs in O(n log n) and takes 1 second for n = {num(1, 9)}000, roughly how long for n = {num(1, 9)}000000?",
                     f"Calculate the average of these numbers: {', '.join(str(num(1, 100)) for _ in range(num(4, 10)))}",
                     f"My code loops {num(10, 99)} times with an inner loop of {num(10, 99)}. How many iterations total?",
                     "Is it possible to tile a chessboard with two opposite corners removed using dominoes? Prove it."])
    if label == "creative" and maybe(0.4):
        return pick([f"Here are some notes about my grandfather: {doc_bio()}\n\nWrite a {pick(['poem', 'eulogy', 'short tribute'])} based on them",
                     f"{doc_story()}\n\nContinue this story", f"Turn this article into a poem:\n{doc()}",
                     f"Write a song inspired by this:\n{doc_travel()}", f"{doc_story()}\n\nRewrite this scene as a comedy",
                     f"Use these facts to write a children's story:\n{doc_science()}", f"{doc_review()}\n\nWrite a funny poem about this review"])
    if label == "chat" and maybe(0.5):
        vent = " ".join(R.sample([
            "So today was rough.", "My manager criticized my work in front of everyone again.", "I came home and just lay on the floor.",
            "I've been feeling like I'm not good enough for a while now.", "My partner says I'm overreacting but I don't think so.",
            "I used to love this job.", f"I've been here {num(2, 9)} years and nothing changes.", "I don't even know what I want anymore.",
            "My friends are all busy with their own lives.", "I haven't slept properly in weeks.", "Part of me wants to just quit.",
            "Sorry for dumping all this on you.", "I guess I just needed to say it to someone.", "Do you think I'm being dramatic?",
            "Anyway, how would you handle this?", "Maybe I just need a vacation lol."], num(5, 12)))
        return vent
    if label == "reasoning" and maybe(0.4):
        months = R.sample(MONTHS, num(4, 8))
        table = "\n".join(f"{m}: {num(800, 5000)} units" for m in months)
        return pick([f"Here are our sales figures:\n{table}\nWhat is the average per month, and what's the percentage change from the first to the last month?",
                     f"{table}\n\nIf the trend continues linearly, how many units will we sell next month? Show the calculation.",
                     f"Monthly data:\n{table}\nWhich month had the largest increase over the previous one, and by how much?",
                     f"Puzzle: {' '.join(R.sample(['Anna is older than Ben.', 'Carl is younger than Ben.', 'Dana is older than Anna.', 'Eve is younger than Carl.', 'Frank is between Anna and Dana in age.'], 4))} Who is the youngest and who is the oldest?"])
    if label == "creative":
        return pick([f"Write a poem about {pick(['recursion', 'a segfault', 'Python', 'git merge conflicts', 'the number pi', 'prime numbers'])}",
                     f"Write a short story in {L} about {pick(SUBJECTS)}", f"Write a haiku and then translate it into {L}",
                     f"Write a funny summary of {pick(['my week', 'a Monday at the office', 'a failed camping trip'])} as an epic poem",
                     "Write a song about summarizing long documents", "Write a limerick about a mathematician",
                     f"Write a story about a programmer who {pick(['falls in love with a bug', 'lives inside a computer', 'can talk to servers'])}"])
    if label == "summarization":
        d = doc(long=True)
        return pick([f"{d}\n\nsummarize this", f"{d}\n\nCan you give me a summary of the above?", f"Summarize:\n{d}",
                     f"{d}\n\ntl;dr", f"{d}\n\nWhat's the gist of all this?", f"{d}\n\nsummarize in {num(2, 5)} bullets"])
    if label == "translation":
        d = doc(long=True)
        return pick([f"{d}\n\nTranslate the above into {L}", f"Translate to {L}:\n{d}", f"{d}\n\ntranslate this to {L.lower()} please",
                     f"Translate this math problem into {L}: {word_problem()}", f"Translate this poem into {L}: Roses are red, violets are blue.",
                     "Translate the following code comments into English: # calcola la media\n# restituisce il risultato"])
    if label == "extraction":
        d = doc(long=True)
        return pick([f"{d}\n\nExtract all dates and names as JSON", f"{d}\n\nWhat's the overall sentiment?",
                     f"{d}\n\nlist every company mentioned", f"Extract the amounts from:\n{d}",
                     f"{d}\n\nClassify each paragraph by topic", f"Extract the variable names from this code: {pick(SNIPPETS)}"])
    if label == "qa":
        return pick(["What is a prime number?", "Who invented calculus?", "What is the Pythagorean theorem?",
                     "Who was Alan Turing?", "When was the first computer built?", "Who wrote Romeo and Juliet?",
                     "What language is spoken in Quebec?", "How many languages are there in the world?",
                     "What is the origin of the English language?", "Who was Shakespeare?", "What is machine translation?",
                     "What's the history of the Python snake's name in mythology?", "What is the Riemann hypothesis about?"])
    return pick([f"I'm learning {L}, it's so hard! Any encouragement?", "I hate math lol", "coding all night, so tired",
                 "I just wrote my first poem and I'm kinda proud", f"I'm moving to a country where they speak {L}, I'm nervous",
                 "my code finally works!!! 🎉", "I failed my calculus exam, feeling terrible", "do you like poetry?",
                 "what's your favorite programming language? just curious", "thanks, that summary helped a lot"])


# ---------------------------------------------------------------- system-prompt context
# prompt_text() may prefix a (capped) system message; personas must not decide the label, while a system
# message that *is* the instruction (payload-only user turn) should.
PERSONAS = ["You are a helpful assistant.", "You are a helpful, harmless and honest AI assistant.", "You are Aria, the virtual assistant of {co}.",
            "You are a senior software engineer who writes clean, tested code.", "You are a witty assistant who loves puns.",
            "You are a patient teacher for high-school students.", "Act as a friendly customer service agent for {co}. Be concise.",
            "You are an AI model deployed in a mobile app. Keep answers short.", "You are a knowledgeable travel guide.",
            "You are a multilingual assistant fluent in 40 languages.", "You are a creative writing coach.",
            "You are a data analyst assistant for {co}.", "You are a calm and supportive listener.", "Answer as accurately as possible.",
            "You are an expert mathematician and physicist.", "You are a careful assistant. If unsure, say so.",
            "Respond in Markdown. Use bullet points when helpful.", "You are a DevOps assistant for {co}'s platform team.",
            "You are an encyclopedia bot. Cite sources where possible.", "Be brief. Today's date is {d}.",
            "You are a legal assistant for a small law firm.", "You are a pirate. Talk like one.", "You are a study buddy for university students."]
TASK_SYSTEMS = {
    "translation": ["Translate the user's message into {L}.", "You are a translation engine: output the {L} translation of every input.",
                    "Translate everything the user writes into {L}. Output only the translation."],
    "summarization": ["Summarize the text the user provides in three bullet points.", "You summarize documents. Reply with a short summary of the input.",
                      "Produce a one-paragraph TL;DR of the user's text."],
    "extraction": ["Extract all named entities from the user's text and return JSON.", "Classify the sentiment of the user's message as positive, negative or neutral.",
                   "Return a JSON object with the dates, people and amounts found in the input.", "Label the intent of each user message."],
}


def with_system() -> tuple[str, str]:
    """A prompt_text()-style sample with a system prefix: persona + any task, or task system + payload."""
    if maybe(0.7):
        lab = pick(LABELS)
        user = GENERATORS[lab]()
        sysm = pick(PERSONAS).format(co=pick(COMPANIES), d=date())
        return lab, f"{sysm[:100]}\n\n{user}"
    lab = pick(list(TASK_SYSTEMS))
    sysm = pick(TASK_SYSTEMS[lab]).format(L=pick(LANGS))
    payload = pick([pick(EN_SENTS), doc(), doc_review(), pick(TWEETS), short_entity_sentence()])
    return lab, f"{sysm[:100]}\n\n{payload}"


GENERATORS: dict[str, Callable[[], str]] = {
    "code": gen_code, "reasoning": gen_reasoning, "creative": gen_creative, "summarization": gen_summarization,
    "translation": gen_translation, "extraction": gen_extraction, "qa": gen_qa, "chat": gen_chat,
}
PER_LABEL = 1400
HARD_PER_LABEL = 120
SYSTEM_EXAMPLES = 800


HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.jsonl"


def build() -> list[dict[str, str]]:
    """Generate the labelled rows; identical output on every run.

    Decontamination: a generated row whose lowercased text equals a held-out prompt is dropped (common
    questions like "What is photosynthesis?" come out of the templates too), so the held-out score is
    never inflated by exact duplicates. That is the only use of the held-out file.
    """
    R.seed(SEED)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    if HELDOUT.exists():
        with HELDOUT.open(encoding="utf-8") as f:
            seen |= {json.loads(line)["text"].strip().lower() for line in f if line.strip()}
    for _ in range(SYSTEM_EXAMPLES):
        label, t = with_system()
        if t.lower() not in seen:
            seen.add(t.lower())
            rows.append({"text": t, "label": label})
    for label in LABELS:
        texts = list(NATURAL[label]) + [gen_hard(label) for _ in range(HARD_PER_LABEL)]
        tries = 0
        while len(texts) < PER_LABEL + len(NATURAL[label]) + HARD_PER_LABEL and tries < PER_LABEL * 6:
            texts.append(GENERATORS[label]())
            tries += 1
        for t in texts:
            t = t.strip()
            if t and t.lower() not in seen:
                seen.add(t.lower())
                rows.append({"text": t, "label": label})
    return rows


def main() -> None:
    rows = build()
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in LABELS}
    print(f"wrote {len(rows)} rows to {OUT}: {counts}")


if __name__ == "__main__":
    main()
