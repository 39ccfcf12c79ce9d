"""Factual prompts: a subject, a relation prompt that names it, and a one-token answer.

Hand-written for causal tracing (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT") and shared by every experiment that needs facts a model knows:
``"The Eiffel Tower is located in the city of"`` -> ``" Paris"``, the subject
``"Eiffel Tower"`` appearing verbatim in the prompt. Every answer is a single token
for SmolLM2's tokenizer (tested); :func:`known_facts` keeps those a model answers
correctly, greedy, on the first token (SmolLM2-135M-Instruct knows about half).

The candidates come in relations (``capital``, ``birthplace``, ``creator``, ...); the
answers were chosen so that the first token of a correct continuation is the answer
itself (``"... was written by William"`` -> ``" Shakespeare"``), never a fragment such
as ``" New"`` of a longer name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from steerlab.interventions.errors import ConfigError, DataError
from steerlab.interventions.inputs import Inputs

__all__ = ["Fact", "FACTS", "RELATIONS", "facts", "KnownFacts", "known_facts"]


@dataclass(frozen=True)
class Fact:
    """One factual prompt. ``target`` (``" " + answer``) is the next token a model should give."""

    relation: str
    subject: str
    prompt: str
    answer: str

    @property
    def target(self) -> str:
        return " " + self.answer

    def subject_tokens(self, tokenizer) -> list[int]:
        """The real-token indices of the subject in the tokenised prompt (the tokens whose
        characters overlap the subject's first occurrence)."""
        start = self.prompt.index(self.subject)
        end = start + len(self.subject)
        enc = tokenizer(self.prompt, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        out = [i for i, (a, b) in enumerate(spans) if a < end and b > start and b > a]
        if not out:
            raise DataError(f"no token of {self.prompt!r} covers its subject {self.subject!r}")
        return out

    def __repr__(self) -> str:
        return f"Fact({self.prompt!r} -> {self.target!r}, subject {self.subject!r})"


# relation: (subject, prompt, answer), the subject verbatim in the prompt
_CANDIDATES: dict[str, tuple[tuple[str, str, str], ...]] = {
    'landmark_city': (
        ('Eiffel Tower', 'The Eiffel Tower is located in the city of', 'Paris'),
        ('Colosseum', 'The Colosseum is located in the city of', 'Rome'),
        ('Big Ben', 'Big Ben is located in the city of', 'London'),
        ('Kremlin', 'The Kremlin is located in the city of', 'Moscow'),
        ('Brandenburg Gate', 'The Brandenburg Gate is located in the city of', 'Berlin'),
        ('Sagrada Familia', 'The Sagrada Familia is located in the city of', 'Barcelona'),
        ('Acropolis', 'The Acropolis is located in the city of', 'Athens'),
        ('Forbidden City', 'The Forbidden City is located in the city of', 'Beijing'),
        ('Sydney Opera House', 'The Sydney Opera House is located in the city of', 'Sydney'),
        ('Louvre', 'The Louvre museum is located in the city of', 'Paris'),
        ('Buckingham Palace', 'Buckingham Palace is located in the city of', 'London'),
        ('Space Needle', 'The Space Needle is located in the city of', 'Seattle'),
        ('CN Tower', 'The CN Tower is located in the city of', 'Toronto'),
        ('Burj Khalifa', 'The Burj Khalifa is located in the city of', 'Dubai'),
        ('Hagia Sophia', 'The Hagia Sophia is located in the city of', 'Istanbul'),
        ('Parthenon', 'The Parthenon is located in the city of', 'Athens'),
        ('Prado Museum', 'The Prado Museum is located in the city of', 'Madrid'),
        ('Uffizi Gallery', 'The Uffizi Gallery is located in the city of', 'Florence'),
        ('Rijksmuseum', 'The Rijksmuseum is located in the city of', 'Amsterdam'),
        ('Tower Bridge', 'Tower Bridge is located in the city of', 'London'),
        ('Red Square', 'Red Square is located in the city of', 'Moscow'),
        ('Tiananmen Square', 'Tiananmen Square is located in the city of', 'Beijing'),
        ('White House', 'The White House is located in the city of', 'Washington'),
        ('Arc de Triomphe', 'The Arc de Triomphe is located in the city of', 'Paris'),
        ('Trevi Fountain', 'The Trevi Fountain is located in the city of', 'Rome'),
        ('Westminster Abbey', 'Westminster Abbey is located in the city of', 'London'),
        ('Charles Bridge', 'The Charles Bridge is located in the city of', 'Prague'),
        ('Notre Dame Cathedral', 'Notre Dame Cathedral is located in the city of', 'Paris'),
        ('Christ the Redeemer', 'The statue of Christ the Redeemer overlooks the city of', 'Rio'),
        ('Vatican', 'The Vatican is located in the city of', 'Rome'),
        ('Pantheon', 'The Pantheon is located in the city of', 'Rome'),
        ('Atomium', 'The Atomium is located in the city of', 'Brussels'),
        ('Little Mermaid statue', 'The Little Mermaid statue is located in the city of', 'Copenhagen'),
    ),
    'capital': (
        ('France', 'The capital of France is', 'Paris'),
        ('Germany', 'The capital of Germany is', 'Berlin'),
        ('Italy', 'The capital of Italy is', 'Rome'),
        ('Spain', 'The capital of Spain is', 'Madrid'),
        ('Japan', 'The capital of Japan is', 'Tokyo'),
        ('China', 'The capital of China is', 'Beijing'),
        ('Russia', 'The capital of Russia is', 'Moscow'),
        ('Egypt', 'The capital of Egypt is', 'Cairo'),
        ('Greece', 'The capital of Greece is', 'Athens'),
        ('Portugal', 'The capital of Portugal is', 'Lisbon'),
        ('Austria', 'The capital of Austria is', 'Vienna'),
        ('Poland', 'The capital of Poland is', 'Warsaw'),
        ('Ireland', 'The capital of Ireland is', 'Dublin'),
        ('Norway', 'The capital of Norway is', 'Oslo'),
        ('Sweden', 'The capital of Sweden is', 'Stockholm'),
        ('Finland', 'The capital of Finland is', 'Helsinki'),
        ('Denmark', 'The capital of Denmark is', 'Copenhagen'),
        ('the Netherlands', 'The capital of the Netherlands is', 'Amsterdam'),
        ('Belgium', 'The capital of Belgium is', 'Brussels'),
        ('Hungary', 'The capital of Hungary is', 'Budapest'),
        ('the Czech Republic', 'The capital of the Czech Republic is', 'Prague'),
        ('Iran', 'The capital of Iran is', 'Tehran'),
        ('Iraq', 'The capital of Iraq is', 'Baghdad'),
        ('Kenya', 'The capital of Kenya is', 'Nairobi'),
        ('South Korea', 'The capital of South Korea is', 'Seoul'),
        ('Peru', 'The capital of Peru is', 'Lima'),
        ('Chile', 'The capital of Chile is', 'Santiago'),
        ('Cuba', 'The capital of Cuba is', 'Havana'),
        ('Canada', 'The capital of Canada is', 'Ottawa'),
        ('Australia', 'The capital of Australia is', 'Canberra'),
        ('the Philippines', 'The capital of the Philippines is', 'Manila'),
        ('Bulgaria', 'The capital of Bulgaria is', 'Sofia'),
        ('Switzerland', 'The capital of Switzerland is', 'Bern'),
        ('Syria', 'The capital of Syria is', 'Damascus'),
        ('Afghanistan', 'The capital of Afghanistan is', 'Kabul'),
        ('Scotland', 'The capital of Scotland is', 'Edinburgh'),
        ('England', 'The capital of England is', 'London'),
        ('Wales', 'The capital of Wales is', 'Cardiff'),
        ('Mexico', 'The capital of Mexico is', 'Mexico'),
        ('Israel', 'The capital of Israel is', 'Jerusalem'),
    ),
    'city_country': (
        ('Lyon', 'Lyon is a city located in the country of', 'France'),
        ('Munich', 'Munich is a city located in the country of', 'Germany'),
        ('Milan', 'Milan is a city located in the country of', 'Italy'),
        ('Barcelona', 'Barcelona is a city located in the country of', 'Spain'),
        ('Osaka', 'Osaka is a city located in the country of', 'Japan'),
        ('Shanghai', 'Shanghai is a city located in the country of', 'China'),
        ('Mumbai', 'Mumbai is a city located in the country of', 'India'),
        ('Sydney', 'Sydney is a city located in the country of', 'Australia'),
        ('Istanbul', 'Istanbul is a city located in the country of', 'Turkey'),
        ('Manchester', 'Manchester is a city located in the country of', 'England'),
        ('Glasgow', 'Glasgow is a city located in the country of', 'Scotland'),
        ('Krakow', 'Krakow is a city located in the country of', 'Poland'),
        ('Porto', 'Porto is a city located in the country of', 'Portugal'),
        ('Zurich', 'Zurich is a city located in the country of', 'Switzerland'),
        ('Geneva', 'Geneva is a city located in the country of', 'Switzerland'),
        ('Antwerp', 'Antwerp is a city located in the country of', 'Belgium'),
        ('Gothenburg', 'Gothenburg is a city located in the country of', 'Sweden'),
        ('Bergen', 'Bergen is a city located in the country of', 'Norway'),
        ('Kyoto', 'Kyoto is a city located in the country of', 'Japan'),
        ('Vancouver', 'Vancouver is a city located in the country of', 'Canada'),
        ('Montreal', 'Montreal is a city located in the country of', 'Canada'),
        ('Melbourne', 'Melbourne is a city located in the country of', 'Australia'),
        ('Casablanca', 'Casablanca is a city located in the country of', 'Morocco'),
        ('Alexandria', 'Alexandria is a city located in the country of', 'Egypt'),
        ('Naples', 'Naples is a city located in the country of', 'Italy'),
        ('Venice', 'Venice is a city located in the country of', 'Italy'),
        ('Seville', 'Seville is a city located in the country of', 'Spain'),
        ('Marseille', 'Marseille is a city located in the country of', 'France'),
        ('Hamburg', 'Hamburg is a city located in the country of', 'Germany'),
        ('Frankfurt', 'Frankfurt is a city located in the country of', 'Germany'),
        ('Salzburg', 'Salzburg is a city located in the country of', 'Austria'),
        ('Bangalore', 'Bangalore is a city located in the country of', 'India'),
        ('Karachi', 'Karachi is a city located in the country of', 'Pakistan'),
        ('Guadalajara', 'Guadalajara is a city located in the country of', 'Mexico'),
        ('Lagos', 'Lagos is a city located in the country of', 'Nigeria'),
        ('Saint Petersburg', 'Saint Petersburg is a city located in the country of', 'Russia'),
        ('Florence', 'Florence is a city located in the country of', 'Italy'),
        ('Toronto', 'Toronto is a city located in the country of', 'Canada'),
        ('Valencia', 'Valencia is a city located in the country of', 'Spain'),
        ('Bordeaux', 'Bordeaux is a city located in the country of', 'France'),
        ('Cologne', 'Cologne is a city located in the country of', 'Germany'),
        ('Edinburgh', 'Edinburgh is a city located in the country of', 'Scotland'),
        ('Nagoya', 'Nagoya is a city located in the country of', 'Japan'),
        ('Delhi', 'Delhi is a city located in the country of', 'India'),
        ('Chennai', 'Chennai is a city located in the country of', 'India'),
        ('Tehran', 'Tehran is a city located in the country of', 'Iran'),
        ('Baghdad', 'Baghdad is a city located in the country of', 'Iraq'),
        ('Cairo', 'Cairo is a city located in the country of', 'Egypt'),
        ('Nairobi', 'Nairobi is a city located in the country of', 'Kenya'),
        ('Lima', 'Lima is a city located in the country of', 'Peru'),
        ('Havana', 'Havana is a city located in the country of', 'Cuba'),
        ('Warsaw', 'Warsaw is a city located in the country of', 'Poland'),
        ('Lisbon', 'Lisbon is a city located in the country of', 'Portugal'),
        ('Dublin', 'Dublin is a city located in the country of', 'Ireland'),
        ('Athens', 'Athens is a city located in the country of', 'Greece'),
        ('Oslo', 'Oslo is a city located in the country of', 'Norway'),
        ('Helsinki', 'Helsinki is a city located in the country of', 'Finland'),
        ('Budapest', 'Budapest is a city located in the country of', 'Hungary'),
        ('Hanoi', 'Hanoi is a city located in the country of', 'Vietnam'),
        ('Bangkok', 'Bangkok is a city located in the country of', 'Thailand'),
    ),
    'company_country': (
        ('Toyota', 'Toyota is a company headquartered in the country of', 'Japan'),
        ('Sony', 'Sony is a company headquartered in the country of', 'Japan'),
        ('Volkswagen', 'Volkswagen is a company headquartered in the country of', 'Germany'),
        ('BMW', 'BMW is a company headquartered in the country of', 'Germany'),
        ('Fiat', 'Fiat is a company headquartered in the country of', 'Italy'),
        ('Renault', 'Renault is a company headquartered in the country of', 'France'),
        ('Nokia', 'Nokia is a company headquartered in the country of', 'Finland'),
        ('IKEA', 'IKEA is a company headquartered in the country of', 'Sweden'),
        ('Volvo', 'Volvo is a company headquartered in the country of', 'Sweden'),
        ('Nestle', 'Nestle is a company headquartered in the country of', 'Switzerland'),
        ('Ferrari', 'Ferrari is a company headquartered in the country of', 'Italy'),
        ('Honda', 'Honda is a company headquartered in the country of', 'Japan'),
        ('Nintendo', 'Nintendo is a company headquartered in the country of', 'Japan'),
        ('Siemens', 'Siemens is a company headquartered in the country of', 'Germany'),
        ('Lego', 'Lego is a company headquartered in the country of', 'Denmark'),
        ('Peugeot', 'Peugeot is a company headquartered in the country of', 'France'),
        ('Adidas', 'Adidas is a company headquartered in the country of', 'Germany'),
        ('Huawei', 'Huawei is a company headquartered in the country of', 'China'),
        ('Alibaba', 'Alibaba is a company headquartered in the country of', 'China'),
        ('Porsche', 'Porsche is a company headquartered in the country of', 'Germany'),
        ('Michelin', 'Michelin is a company headquartered in the country of', 'France'),
        ('Ericsson', 'Ericsson is a company headquartered in the country of', 'Sweden'),
        ('Spotify', 'Spotify is a company headquartered in the country of', 'Sweden'),
        ('Gucci', 'Gucci is a company headquartered in the country of', 'Italy'),
        ('Zara', 'Zara is a company headquartered in the country of', 'Spain'),
        ('Tata', 'Tata is a company headquartered in the country of', 'India'),
        ('Mercedes', 'Mercedes is a company headquartered in the country of', 'Germany'),
        ('Nissan', 'Nissan is a company headquartered in the country of', 'Japan'),
        ('Lufthansa', 'Lufthansa is an airline based in the country of', 'Germany'),
        ('Aeroflot', 'Aeroflot is an airline based in the country of', 'Russia'),
        ('Qantas', 'Qantas is an airline based in the country of', 'Australia'),
    ),
    'product_maker': (
        ('iPhone', 'The iPhone is made by', 'Apple'),
        ('Windows', 'The Windows operating system is developed by', 'Microsoft'),
        ('PlayStation', 'The PlayStation is made by', 'Sony'),
        ('Xbox', 'The Xbox is made by', 'Microsoft'),
        ('Android', 'The Android operating system is developed by', 'Google'),
        ('Photoshop', 'Photoshop is developed by', 'Adobe'),
        ('Prius', 'The Prius is a car made by', 'Toyota'),
        ('Mustang', 'The Mustang is a car made by', 'Ford'),
        ('Kindle', 'The Kindle is made by', 'Amazon'),
        ('Model S', 'The Model S is a car made by', 'Tesla'),
        ('Gmail', 'Gmail is an email service made by', 'Google'),
        ('YouTube', 'YouTube is owned by', 'Google'),
        ('Instagram', 'Instagram is owned by', 'Facebook'),
        ('iPad', 'The iPad is made by', 'Apple'),
        ('MacBook', 'The MacBook is made by', 'Apple'),
        ('Pentium', 'The Pentium processor is made by', 'Intel'),
        ('Walkman', 'The Walkman was made by', 'Sony'),
        ('Game Boy', 'The Game Boy was made by', 'Nintendo'),
        ('Excel', 'Excel is a spreadsheet program made by', 'Microsoft'),
        ('Chrome', 'The Chrome browser is developed by', 'Google'),
        ('Galaxy', 'The Galaxy phone is made by', 'Samsung'),
    ),
    'birthplace': (
        ('Albert Einstein', 'Albert Einstein was born in the country of', 'Germany'),
        ('Wolfgang Amadeus Mozart', 'Wolfgang Amadeus Mozart was born in the country of', 'Austria'),
        ('Pablo Picasso', 'Pablo Picasso was born in the country of', 'Spain'),
        ('William Shakespeare', 'William Shakespeare was born in the country of', 'England'),
        ('Mahatma Gandhi', 'Mahatma Gandhi was born in the country of', 'India'),
        ('Confucius', 'Confucius was born in the country of', 'China'),
        ('Leo Tolstoy', 'Leo Tolstoy was born in the country of', 'Russia'),
        ('Dante Alighieri', 'Dante Alighieri was born in the country of', 'Italy'),
        ('Johann Wolfgang von Goethe', 'Johann Wolfgang von Goethe was born in the country of', 'Germany'),
        ('Miguel de Cervantes', 'Miguel de Cervantes was born in the country of', 'Spain'),
        ('Frederic Chopin', 'Frederic Chopin was born in the country of', 'Poland'),
        ('Ludwig van Beethoven', 'Ludwig van Beethoven was born in the country of', 'Germany'),
        ('Galileo Galilei', 'Galileo Galilei was born in the country of', 'Italy'),
        ('Nicolaus Copernicus', 'Nicolaus Copernicus was born in the country of', 'Poland'),
        ('Charles Darwin', 'Charles Darwin was born in the country of', 'England'),
        ('Isaac Newton', 'Isaac Newton was born in the country of', 'England'),
        ('Marie Curie', 'Marie Curie was born in the country of', 'Poland'),
        ('Frida Kahlo', 'Frida Kahlo was born in the country of', 'Mexico'),
        ('Lionel Messi', 'Lionel Messi was born in the country of', 'Argentina'),
        ('Cristiano Ronaldo', 'Cristiano Ronaldo was born in the country of', 'Portugal'),
        ('Vladimir Putin', 'Vladimir Putin was born in the country of', 'Russia'),
        ('Angela Merkel', 'Angela Merkel was born in the country of', 'Germany'),
        ('Emmanuel Macron', 'Emmanuel Macron was born in the country of', 'France'),
        ('Leonardo da Vinci', 'Leonardo da Vinci was born in the country of', 'Italy'),
        ('Napoleon Bonaparte', 'Napoleon Bonaparte was born in the country of', 'France'),
        ('Victor Hugo', 'Victor Hugo was born in the country of', 'France'),
        ('Fyodor Dostoevsky', 'Fyodor Dostoevsky was born in the country of', 'Russia'),
        ('Gabriel Garcia Marquez', 'Gabriel Garcia Marquez was born in the country of', 'Colombia'),
        ('Hayao Miyazaki', 'Hayao Miyazaki was born in the country of', 'Japan'),
        ('Pele', 'The footballer Pele was born in the country of', 'Brazil'),
        ('Rabindranath Tagore', 'Rabindranath Tagore was born in the country of', 'India'),
        ('Antonio Vivaldi', 'Antonio Vivaldi was born in the country of', 'Italy'),
        ('Pyotr Tchaikovsky', 'Pyotr Tchaikovsky was born in the country of', 'Russia'),
        ('Salvador Dali', 'Salvador Dali was born in the country of', 'Spain'),
        ('Claude Monet', 'Claude Monet was born in the country of', 'France'),
        ('Sigmund Freud', 'Sigmund Freud was born in the country of', 'Austria'),
        ('Karl Marx', 'Karl Marx was born in the country of', 'Germany'),
    ),
    'sport': (
        ('Michael Jordan', 'Michael Jordan is famous for playing the sport of', 'basketball'),
        ('Tiger Woods', 'Tiger Woods is famous for playing the sport of', 'golf'),
        ('Roger Federer', 'Roger Federer is famous for playing the sport of', 'tennis'),
        ('Serena Williams', 'Serena Williams is famous for playing the sport of', 'tennis'),
        ('Babe Ruth', 'Babe Ruth is famous for playing the sport of', 'baseball'),
        ('Wayne Gretzky', 'Wayne Gretzky is famous for playing the sport of', 'hockey'),
        ('Magnus Carlsen', 'Magnus Carlsen is famous for playing the game of', 'chess'),
        ('LeBron James', 'LeBron James is famous for playing the sport of', 'basketball'),
        ('Rafael Nadal', 'Rafael Nadal is famous for playing the sport of', 'tennis'),
        ('Kobe Bryant', 'Kobe Bryant is famous for playing the sport of', 'basketball'),
        ('Sachin Tendulkar', 'Sachin Tendulkar is famous for playing the sport of', 'cricket'),
        ('Novak Djokovic', 'Novak Djokovic is famous for playing the sport of', 'tennis'),
        ("Shaquille O'Neal", "Shaquille O'Neal is famous for playing the sport of", 'basketball'),
        ('Tom Brady', 'Tom Brady is famous for playing the sport of', 'football'),
        ('David Beckham', 'David Beckham is famous for playing the sport of', 'football'),
        ('Stephen Curry', 'Stephen Curry is famous for playing the sport of', 'basketball'),
        ('Garry Kasparov', 'Garry Kasparov is famous for playing the game of', 'chess'),
        ('Muhammad Ali', 'Muhammad Ali is famous for the sport of', 'boxing'),
        ('Michael Phelps', 'Michael Phelps is famous for the sport of', 'swimming'),
        ('Usain Bolt', 'Usain Bolt is famous for the sport of', 'running'),
    ),
    'instrument': (
        ('Jimi Hendrix', 'Jimi Hendrix was famous for playing the', 'guitar'),
        ('Louis Armstrong', 'Louis Armstrong was famous for playing the', 'trumpet'),
        ('Ringo Starr', 'Ringo Starr was famous for playing the', 'drums'),
        ('Miles Davis', 'Miles Davis was famous for playing the', 'trumpet'),
        ('Eric Clapton', 'Eric Clapton is famous for playing the', 'guitar'),
        ('Niccolo Paganini', 'Niccolo Paganini was famous for playing the', 'violin'),
        ('Elton John', 'Elton John is famous for playing the', 'piano'),
        ('Franz Liszt', 'Franz Liszt was famous for playing the', 'piano'),
        ('Itzhak Perlman', 'Itzhak Perlman is famous for playing the', 'violin'),
    ),
    'profession': (
        ('Ludwig van Beethoven', 'Ludwig van Beethoven was a famous German', 'composer'),
        ('Albert Einstein', 'Albert Einstein was a famous theoretical', 'physicist'),
        ('Vincent van Gogh', 'Vincent van Gogh was a famous Dutch', 'painter'),
        ('Ernest Hemingway', 'Ernest Hemingway was a famous American', 'writer'),
        ('Neil Armstrong', 'Neil Armstrong was a famous American', 'astronaut'),
        ('Florence Nightingale', 'Florence Nightingale was a famous British', 'nurse'),
        ('Sigmund Freud', 'Sigmund Freud was a famous Austrian', 'psychologist'),
        ('Elvis Presley', 'Elvis Presley was a famous American', 'singer'),
    ),
    'creator': (
        ('Hamlet', 'Hamlet was written by William', 'Shakespeare'),
        ('Nineteen Eighty-Four', 'Nineteen Eighty-Four was written by George', 'Orwell'),
        ('Pride and Prejudice', 'Pride and Prejudice was written by Jane', 'Austen'),
        ('Oliver Twist', 'Oliver Twist was written by Charles', 'Dickens'),
        ('Mona Lisa', 'The Mona Lisa was painted by Leonardo da', 'Vinci'),
        ('Starry Night', 'The Starry Night was painted by Vincent van', 'Gogh'),
        ('Guernica', 'Guernica was painted by Pablo', 'Picasso'),
        ('Odyssey', 'The Odyssey was written by the Greek poet', 'Homer'),
        ('Moonlight Sonata', 'The Moonlight Sonata was composed by Ludwig van', 'Beethoven'),
        ('Magic Flute', 'The Magic Flute was composed by Wolfgang Amadeus', 'Mozart'),
        ('theory of relativity', 'The theory of relativity was developed by Albert', 'Einstein'),
        ('telephone', 'The telephone was invented by Alexander Graham', 'Bell'),
        ('light bulb', 'The light bulb was invented by Thomas', 'Edison'),
        ('Microsoft', 'Microsoft was founded by Bill', 'Gates'),
        ('Apple', 'Apple was founded by Steve', 'Jobs'),
        ('Tesla', 'The company Tesla is led by Elon', 'Musk'),
        ('Penicillin', 'Penicillin was discovered by Alexander', 'Fleming'),
        ('law of gravity', 'The law of gravity was formulated by Isaac', 'Newton'),
        ('The Origin of Species', 'The Origin of Species was written by Charles', 'Darwin'),
        ('Romeo and Juliet', 'Romeo and Juliet was written by William', 'Shakespeare'),
        ('The Raven', 'The Raven was written by Edgar Allan', 'Poe'),
        ('Les Miserables', 'Les Miserables was written by Victor', 'Hugo'),
        ('The Communist Manifesto', 'The Communist Manifesto was written by Karl', 'Marx'),
        ('Sherlock Holmes', 'Sherlock Holmes was created by Arthur Conan', 'Doyle'),
        ('Mickey Mouse', 'Mickey Mouse was created by Walt', 'Disney'),
        ('The Hobbit', 'The Hobbit was written by J.R.R.', 'Tolkien'),
    ),
    'language': (
        ('Brazil', 'The official language of Brazil is', 'Portuguese'),
        ('Mexico', 'The official language of Mexico is', 'Spanish'),
        ('Argentina', 'The official language of Argentina is', 'Spanish'),
        ('France', 'The official language of France is', 'French'),
        ('Germany', 'The official language of Germany is', 'German'),
        ('Japan', 'The official language of Japan is', 'Japanese'),
        ('Russia', 'The official language of Russia is', 'Russian'),
        ('Italy', 'The official language of Italy is', 'Italian'),
        ('Egypt', 'The official language of Egypt is', 'Arabic'),
        ('the Netherlands', 'The official language of the Netherlands is', 'Dutch'),
        ('Sweden', 'The official language of Sweden is', 'Swedish'),
        ('Poland', 'The official language of Poland is', 'Polish'),
        ('Greece', 'The official language of Greece is', 'Greek'),
        ('Turkey', 'The official language of Turkey is', 'Turkish'),
        ('Israel', 'The official language of Israel is', 'Hebrew'),
        ('South Korea', 'The official language of South Korea is', 'Korean'),
        ('Vietnam', 'The official language of Vietnam is', 'Vietnamese'),
        ('Thailand', 'The official language of Thailand is', 'Thai'),
        ('Portugal', 'The official language of Portugal is', 'Portuguese'),
        ('Austria', 'The official language of Austria is', 'German'),
        ('Finland', 'The official language of Finland is', 'Finnish'),
        ('Hungary', 'The official language of Hungary is', 'Hungarian'),
        ('Norway', 'The official language of Norway is', 'Norwegian'),
        ('Denmark', 'The official language of Denmark is', 'Danish'),
        ('Ukraine', 'The official language of Ukraine is', 'Ukrainian'),
        ('Iran', 'The official language of Iran is', 'Persian'),
        ('Chile', 'The official language of Chile is', 'Spanish'),
        ('Colombia', 'The official language of Colombia is', 'Spanish'),
        ('Peru', 'The official language of Peru is', 'Spanish'),
        ('Cuba', 'The official language of Cuba is', 'Spanish'),
        ('Saudi Arabia', 'The official language of Saudi Arabia is', 'Arabic'),
        ('Morocco', 'The official language of Morocco is', 'Arabic'),
        ('Vladimir Putin', 'The mother tongue of Vladimir Putin is', 'Russian'),
        ('Emmanuel Macron', 'The mother tongue of Emmanuel Macron is', 'French'),
        ('Angela Merkel', 'The mother tongue of Angela Merkel is', 'German'),
    ),
    'currency': (
        ('the United Kingdom', 'The currency of the United Kingdom is the', 'pound'),
        ('Switzerland', 'The currency of Switzerland is the', 'Swiss'),
        ('Germany', 'The currency of Germany is the', 'euro'),
        ('the United States', 'The currency of the United States is the', 'dollar'),
        ('South Korea', 'The currency of South Korea is the', 'won'),
        ('France', 'The currency of France is the', 'euro'),
        ('Italy', 'The currency of Italy is the', 'euro'),
        ('Canada', 'The currency of Canada is the', 'Canadian'),
        ('Australia', 'The currency of Australia is the', 'Australian'),
    ),
    'continent': (
        ('Kenya', 'Kenya is a country on the continent of', 'Africa'),
        ('Japan', 'Japan is a country on the continent of', 'Asia'),
        ('France', 'France is a country on the continent of', 'Europe'),
        ('Egypt', 'Egypt is a country on the continent of', 'Africa'),
        ('India', 'India is a country on the continent of', 'Asia'),
        ('Nigeria', 'Nigeria is a country on the continent of', 'Africa'),
        ('Germany', 'Germany is a country on the continent of', 'Europe'),
        ('China', 'China is a country on the continent of', 'Asia'),
        ('Morocco', 'Morocco is a country on the continent of', 'Africa'),
        ('Vietnam', 'Vietnam is a country on the continent of', 'Asia'),
        ('Sweden', 'Sweden is a country on the continent of', 'Europe'),
        ('Ghana', 'Ghana is a country on the continent of', 'Africa'),
        ('Thailand', 'Thailand is a country on the continent of', 'Asia'),
        ('Poland', 'Poland is a country on the continent of', 'Europe'),
        ('Mongolia', 'Mongolia is a country on the continent of', 'Asia'),
        ('Ethiopia', 'Ethiopia is a country on the continent of', 'Africa'),
        ('Italy', 'Italy is a country on the continent of', 'Europe'),
    ),
    'place_country': (
        ('Mount Everest', 'Mount Everest is located in the country of', 'Nepal'),
        ('Mount Fuji', 'Mount Fuji is located in the country of', 'Japan'),
        ('Kilimanjaro', 'Mount Kilimanjaro is located in the country of', 'Tanzania'),
        ('Machu Picchu', 'Machu Picchu is located in the country of', 'Peru'),
        ('Angkor Wat', 'Angkor Wat is located in the country of', 'Cambodia'),
        ('Petra', 'The ancient city of Petra is located in the country of', 'Jordan'),
        ('Stonehenge', 'Stonehenge is located in the country of', 'England'),
        ('Chichen Itza', 'Chichen Itza is located in the country of', 'Mexico'),
        ('Great Wall', 'The Great Wall is located in the country of', 'China'),
        ('Pyramids of Giza', 'The Pyramids of Giza are located in the country of', 'Egypt'),
        ('Taj Mahal', 'The Taj Mahal is located in the country of', 'India'),
        ('Lake Baikal', 'Lake Baikal is located in the country of', 'Russia'),
        ('Great Barrier Reef', 'The Great Barrier Reef is located off the coast of', 'Australia'),
        ('Amazon rainforest', 'The Amazon rainforest is mostly located in the country of', 'Brazil'),
        ('Seine', 'The river Seine flows through the city of', 'Paris'),
        ('Thames', 'The river Thames flows through the city of', 'London'),
        ('Tiber', 'The river Tiber flows through the city of', 'Rome'),
        ('Nile', 'The river Nile flows through the country of', 'Egypt'),
        ('Bavaria', 'Bavaria is a region in the country of', 'Germany'),
        ('Tuscany', 'Tuscany is a region in the country of', 'Italy'),
        ('Catalonia', 'Catalonia is a region in the country of', 'Spain'),
        ('Normandy', 'Normandy is a region in the country of', 'France'),
        ('Siberia', 'Siberia is a region in the country of', 'Russia'),
        ('Sicily', 'Sicily is an island belonging to the country of', 'Italy'),
        ('Crete', 'Crete is an island belonging to the country of', 'Greece'),
        ('Corsica', 'Corsica is an island belonging to the country of', 'France'),
        ('Hokkaido', 'Hokkaido is an island belonging to the country of', 'Japan'),
        ('Tasmania', 'Tasmania is an island belonging to the country of', 'Australia'),
        ('Bali', 'Bali is an island belonging to the country of', 'Indonesia'),
        ('Sardinia', 'Sardinia is an island belonging to the country of', 'Italy'),
    ),
    'dish_origin': (
        ('Sushi', 'Sushi is a traditional dish from the country of', 'Japan'),
        ('Pizza', 'Pizza is a traditional dish from the country of', 'Italy'),
        ('Tacos', 'Tacos are a traditional dish from the country of', 'Mexico'),
        ('Paella', 'Paella is a traditional dish from the country of', 'Spain'),
        ('Kimchi', 'Kimchi is a traditional dish from the country of', 'Korea'),
        ('Pad thai', 'Pad thai is a traditional dish from the country of', 'Thailand'),
        ('Goulash', 'Goulash is a traditional dish from the country of', 'Hungary'),
        ('Pho', 'Pho is a traditional dish from the country of', 'Vietnam'),
        ('Haggis', 'Haggis is a traditional dish from the country of', 'Scotland'),
        ('Baklava', 'Baklava is a traditional dish from the country of', 'Turkey'),
        ('croissant', 'The croissant is a traditional pastry from the country of', 'France'),
        ('Bratwurst', 'Bratwurst is a traditional sausage from the country of', 'Germany'),
        ('Curry', 'Curry is a traditional dish from the country of', 'India'),
        ('Falafel', 'Falafel is a traditional dish from the country of', 'Egypt'),
        ('Pierogi', 'Pierogi are a traditional dish from the country of', 'Poland'),
    ),
    'animal': (
        ('dog', 'A baby dog is called a', 'puppy'),
        ('cat', 'A baby cat is called a', 'kitten'),
        ('cow', 'A baby cow is called a', 'calf'),
        ('sheep', 'A baby sheep is called a', 'lamb'),
        ('Bees', 'Bees make a sweet food called', 'honey'),
        ('spider', 'A spider has eight', 'legs'),
        ('kangaroo', 'The kangaroo is an animal native to', 'Australia'),
        ('panda', 'The giant panda is an animal native to', 'China'),
        ('penguin', 'The emperor penguin lives in', 'Antarctica'),
    ),
}

FACTS: tuple[Fact, ...] = tuple(Fact(rel, s, p, a) for rel, rows in _CANDIDATES.items() for s, p, a in rows)
RELATIONS: tuple[str, ...] = tuple(_CANDIDATES)


def facts(relations: str | Iterable[str] | None = None) -> list[Fact]:
    """The candidate facts, all of them or those of ``relations`` (see :data:`RELATIONS`)."""
    if relations is None:
        return list(FACTS)
    wanted = [relations] if isinstance(relations, str) else list(relations)
    unknown = [r for r in wanted if r not in _CANDIDATES]
    if unknown:
        raise ConfigError(f"relations={unknown}: unknown; expected some of {list(RELATIONS)}")
    return [f for f in FACTS if f.relation in wanted]


@dataclass
class KnownFacts:
    """Which candidates a model answers correctly (greedy, first token)."""

    candidates: list[Fact]
    predictions: list[str]  # the model's greedy next token, decoded
    probabilities: list[float]  # the model's probability of each fact's answer
    skipped: list[Fact]  # answers that are not one token for this tokenizer

    @property
    def correct(self) -> list[bool]:
        return [p == f.target for f, p in zip(self.candidates, self.predictions, strict=True)]

    @property
    def kept(self) -> list[Fact]:
        return [f for f, ok in zip(self.candidates, self.correct, strict=True) if ok]

    @property
    def rate(self) -> float:
        return len(self.kept) / len(self.candidates) if self.candidates else float("nan")

    def by_relation(self) -> dict[str, tuple[int, int]]:
        """Per relation: (answered correctly, candidates)."""
        out: dict[str, list[int]] = {}
        for f, ok in zip(self.candidates, self.correct, strict=True):
            row = out.setdefault(f.relation, [0, 0])
            row[0] += ok
            row[1] += 1
        return {k: (a, b) for k, (a, b) in out.items()}

    def table(self) -> str:
        rows = [f"{'relation':<16} {'known':>5} / {'asked':<5} rate"]
        for rel, (k, n) in self.by_relation().items():
            rows.append(f"{rel:<16} {k:>5} / {n:<5} {k / n:.2f}")
        rows.append(f"{'all':<16} {len(self.kept):>5} / {len(self.candidates):<5} {self.rate:.2f}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        skipped = f", {len(self.skipped)} skipped (answer not one token)" if self.skipped else ""
        return f"KnownFacts({len(self.kept)} of {len(self.candidates)} answered correctly, rate {self.rate:.2f}{skipped})"


def _answer_ids(tokenizer, candidates: Sequence[Fact]) -> tuple[list[Fact], list[int], list[Fact]]:
    keep, ids, skipped = [], [], []
    for f in candidates:
        t = tokenizer(f.target, add_special_tokens=False).input_ids
        if len(t) == 1:
            keep.append(f)
            ids.append(t[0])
        else:
            skipped.append(f)
    return keep, ids, skipped


def known_facts(lab, candidates: Sequence[Fact] | None = None, *, batch_size: int = 64) -> KnownFacts:
    """Ask ``lab``'s model every candidate; keep those whose greedy next token is the answer.

    Candidates whose answer is not a single token for the lab's tokenizer are set aside
    (``skipped``), not asked. One forward per ``batch_size`` prompts, logits at the last
    real token only.
    """
    if lab.tokenizer is None:
        raise DataError("known_facts needs the lab's tokenizer: wrap(model, tokenizer)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected a positive int")
    todo = list(FACTS if candidates is None else candidates)
    if not all(isinstance(f, Fact) for f in todo):
        raise DataError("candidates must be Fact objects (see steerlab.alignment.tasks.facts)")
    asked, ids, skipped = _answer_ids(lab.tokenizer, todo)
    preds: list[str] = []
    probs: list[float] = []
    for i in range(0, len(asked), batch_size):
        chunk = asked[i : i + batch_size]
        last = _last_logits(lab, [f.prompt for f in chunk])
        p = last.softmax(-1)[torch.arange(len(chunk)), torch.tensor(ids[i : i + batch_size])]
        preds += [lab.tokenizer.decode([int(t)]) for t in last.argmax(-1)]
        probs += p.tolist()
    return KnownFacts(asked, preds, probs, skipped)


def _last_logits(lab, prompts: list[str]) -> Tensor:
    """Next-token logits ``[batch, vocab]`` at each prompt's last real token (either padding side)."""
    inp = Inputs.of(prompts, tokenizer=lab.tokenizer, device=lab.device)
    info = inp.mask_info()
    left = bool((info.starts + info.lengths == info.seq).all())  # every prompt ends at the last column
    with torch.no_grad():
        logits = lab.run(inp, **lab.facts.no_cache, **({"logits_to_keep": 1} if left else {})).logits
    if left:
        return logits[:, -1].float()
    last: Int[Tensor, " batch"] = info.starts + info.lengths - 1
    return logits[torch.arange(len(prompts), device=logits.device), last].float()
