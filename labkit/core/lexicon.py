"""The Chinese↔English lexicon behind the embedded corpus.

Each table is a block of `|`-separated lines so that a reader can audit the
vocabulary at a glance; `labkit.core.data` parses them once at import. English
inflection (plurals, verb forms, comparatives) is derived by rule, with the
irregular forms written out in the rows that need them.

Left out on purpose: polysemy beyond what the object class decides (看 is
"read" for books and "watch" for films), classifiers other than the common
ones, and idioms. The corpus teaches a model grammar, not the whole language.
"""

from __future__ import annotations

# zh | measure word | english singular | english plural ('' = regular) | class
NOUNS = """
书|本|book||read
杂志|本|magazine||read
报纸|份|newspaper||read
信|封|letter||read
故事|个|story||read
词典|本|dictionary||read
小说|本|novel||read
电影|部|movie||watch
电视剧|部|TV show||watch
比赛|场|game||watch
苹果|个|apple||food
香蕉|根|banana||food
橘子|个|orange||food
面包|块|piece of bread|pieces of bread|food
蛋糕|块|cake||food
饺子|个|dumpling||food
鸡蛋|个|egg||food
西瓜|个|watermelon||food
土豆|个|potato|potatoes|food
西红柿|个|tomato|tomatoes|food
饼干|块|cookie||food
包子|个|bun||food
葡萄|串|bunch of grapes|bunches of grapes|food
猫|只|cat||animal
狗|只|dog||animal
鸟|只|bird||animal
马|匹|horse||animal
鱼|条|fish|fish|animal
兔子|只|rabbit||animal
老虎|只|tiger||animal
熊猫|只|panda||animal
猴子|只|monkey||animal
鸭子|只|duck||animal
老鼠|只|mouse|mice|animal
羊|只|sheep|sheep|animal
牛|头|cow||animal
大象|头|elephant||animal
车|辆|car||thing
自行车|辆|bike||thing
公共汽车|辆|bus|buses|thing
桌子|张|table||thing
椅子|把|chair||thing
床|张|bed||thing
门|扇|door||thing
窗户|扇|window||thing
杯子|个|cup||thing
盒子|个|box|boxes|thing
包|个|bag||thing
钥匙|把|key||thing
手机|部|phone||thing
电脑|台|computer||thing
相机|台|camera||thing
手表|块|watch|watches|thing
帽子|顶|hat||thing
衣服|件|shirt||thing
裙子|条|skirt||thing
鞋|只|shoe||thing
伞|把|umbrella||thing
钢笔|支|pen||thing
铅笔|支|pencil||thing
刀|把|knife|knives|thing
瓶子|个|bottle||thing
花|朵|flower||thing
礼物|份|gift||thing
球|个|ball||thing
灯|盏|lamp||thing
钱包|个|wallet||thing
镜子|面|mirror||thing
地图|张|map||thing
照片|张|photo||thing
画|幅|painting||thing
票|张|ticket||thing
玩具|个|toy||thing
沙发|张|sofa||thing
冰箱|台|fridge||thing
碗|个|bowl||thing
盘子|个|plate||thing
勺子|把|spoon||thing
篮子|个|basket||thing
房子|座|house||thing
老师|位|teacher||person
学生|个|student||person
医生|位|doctor||person
朋友|个|friend||person
孩子|个|child|children|person
女孩|个|girl||person
男孩|个|boy||person
妈妈|位|mother||person
爸爸|位|father||person
警察|个|police officer||person
司机|个|driver||person
邻居|个|neighbor||person
工人|个|worker||person
客人|位|guest||person
经理|位|manager||person
护士|个|nurse||person
农民|个|farmer||person
厨师|个|cook||person
作家|位|writer||person
桃子|个|peach|peaches|food
梨|个|pear||food
草莓|个|strawberry|strawberries|food
三明治|个|sandwich|sandwiches|food
汉堡|个|hamburger||food
月饼|块|mooncake||food
巧克力|块|piece of chocolate|pieces of chocolate|food
狼|只|wolf|wolves|animal
狮子|只|lion||animal
蛇|条|snake||animal
青蛙|只|frog||animal
鸡|只|chicken||animal
蝴蝶|只|butterfly|butterflies|animal
乌龟|只|turtle||animal
书包|个|schoolbag||thing
笔记本|个|notebook||thing
枕头|个|pillow||thing
毯子|条|blanket||thing
蜡烛|支|candle||thing
戒指|枚|ring||thing
项链|条|necklace||thing
风筝|个|kite||thing
钟|个|clock||thing
毛巾|条|towel||thing
牙刷|把|toothbrush|toothbrushes|thing
信封|个|envelope||thing
锅|口|pot||thing
奶奶|位|grandmother||person
爷爷|位|grandfather||person
哥哥|个|older brother||person
姐姐|个|older sister||person
弟弟|个|younger brother||person
妹妹|个|younger sister||person
律师|位|lawyer||person
科学家|位|scientist||person
画家|位|painter||person
服务员|个|waiter||person
歌手|个|singer||person
"""

# zh | english singular | english plural — drinks take a container measure word.
DRINKS = """
水|water
茶|tea
咖啡|coffee
牛奶|milk
果汁|juice
啤酒|beer
汤|soup
"""

# zh | english singular | english plural
CONTAINERS = """
杯|cup|cups
瓶|bottle|bottles
碗|bowl|bowls
"""

# zh | english base | object class ('' = intransitive) | irregular past | ing ('' = rule)
# A base of two words ("look for") inflects its first word.
VERBS = """
吃|eat|food|ate|
喝|drink|drink|drank|
看|read|read|read|
写|write|read|wrote|writing
看|watch|watch||
买|buy|thing,food,read|bought|
卖|sell|thing,food|sold|
要|want|thing,food,drink||
喜欢|like|thing,food,animal,person,drink,read,watch||liking
找|look for|thing,animal,person||
找到|find|thing,animal,person|found|
丢|lose|thing|lost|losing
带|bring|thing,food|brought|
拿|take|thing,food|took|taking
用|use|thing||using
修|fix|thing||
借|borrow|thing,read||
画|draw|thing,animal,person|drew|
打开|open|thing,read||
洗|wash|thing,food||
擦|clean|thing||
选|choose|thing,food,read|chose|choosing
收到|receive|thing,read||receiving
扔|throw|thing,food|threw|
做|make|food|made|making
切|cut|food|cut|cutting
喂|feed|animal|fed|
养|keep|animal|kept|
看见|see|thing,animal,person|saw|
抓|catch|animal|caught|
帮助|help|person||
认识|know|person|knew|
等|wait for|person||
见|meet|person|met|
叫|call|person||
教|teach|person|taught|
问|ask|person||
相信|believe|person||believing
爱|love|animal,person||loving
想念|miss|animal,person||
接|pick up|person||picking up
照顾|take care of|animal,person|took care of|taking care of
邀请|invite|person||inviting
跑步|run||ran|running
游泳|swim||swam|swimming
睡觉|sleep||slept|
工作|work|||
唱歌|sing||sang|
跳舞|dance|||dancing
哭|cry|||
笑|laugh|||
学习|study|||
休息|rest|||
散步|take a walk||took a walk|taking a walk
做饭|cook|||
开车|drive||drove|driving
起床|get up||got up|getting up
回家|go home||went home|
"""

# zh attributive (with 的 where Chinese needs it) | zh predicative | english | comparative ('' = rule) | noun classes
ADJECTIVES = """
大|大|big|bigger|thing,animal,food
小|小|small||thing,animal,food
新|新|new||thing,read
旧|旧|old||thing,read
红|红|red|redder|thing,food
白|白|white||thing,animal
黑|黑|black||thing,animal
蓝色的|蓝|blue||thing
绿色的|绿|green||thing,food
黄色的|黄|yellow||thing,food
贵的|贵|expensive|more expensive|thing,food,read
便宜的|便宜|cheap||thing,food,read
漂亮的|漂亮|beautiful|more beautiful|thing,animal,person
重的|重|heavy|heavier|thing,animal
轻的|轻|light||thing
干净的|干净|clean||thing,animal
脏的|脏|dirty|dirtier|thing,animal
长的|长|long||thing,read,watch
短的|短|short||thing,read,watch
有趣的|有趣|interesting|more interesting|read,watch,person
无聊的|无聊|boring|more boring|read,watch
新鲜的|新鲜|fresh||food
甜的|甜|sweet||food
好吃的|好吃|delicious|more delicious|food
可爱的|可爱|cute|cuter|animal
胖的|胖|fat|fatter|animal
快的|快|fast||animal,thing
慢的|慢|slow||animal,thing
饿的|饿|hungry|hungrier|animal,person
高的|高|tall||person,animal
矮的|矮|short||person
聪明的|聪明|smart||person,animal
友好的|友好|friendly|friendlier|person,animal
忙的|忙|busy|busier|person
累的|累|tired|more tired|person
高兴的|高兴|happy|happier|person
年轻的|年轻|young||person
老的|老|old||person,animal
安静的|安静|quiet||person,animal
勇敢的|勇敢|brave|braver|person
"""

# zh | english with "to" | english with "at"/"in"
PLACES = """
学校|to school|at school
公园|to the park|in the park
商店|to the store|at the store
图书馆|to the library|at the library
医院|to the hospital|at the hospital
餐厅|to the restaurant|at the restaurant
办公室|to the office|at the office
超市|to the supermarket|at the supermarket
银行|to the bank|at the bank
机场|to the airport|at the airport
火车站|to the train station|at the train station
博物馆|to the museum|at the museum
动物园|to the zoo|at the zoo
花园|to the garden|in the garden
厨房|to the kitchen|in the kitchen
教室|to the classroom|in the classroom
海边|to the beach|at the beach
山上|to the mountains|in the mountains
北京|to Beijing|in Beijing
上海|to Shanghai|in Shanghai
广州|to Guangzhou|in Guangzhou
香港|to Hong Kong|in Hong Kong
伦敦|to London|in London
纽约|to New York|in New York
东京|to Tokyo|in Tokyo
巴黎|to Paris|in Paris
农村|to the countryside|in the countryside
咖啡馆|to the cafe|at the cafe
电影院|to the cinema|at the cinema
体育馆|to the gym|at the gym
"""

# zh | english
NAMES = """
小明|Xiaoming
小红|Xiaohong
李华|Li Hua
王伟|Wang Wei
张丽|Zhang Li
刘洋|Liu Yang
陈静|Chen Jing
杨帆|Yang Fan
赵雷|Zhao Lei
周琳|Zhou Lin
孙悦|Sun Yue
马丁|Martin
安娜|Anna
汤姆|Tom
玛丽|Mary
约翰|John
露西|Lucy
大卫|David
"""

# zh | english | tense it implies (past|present|future)
TIMES = """
昨天|yesterday|past
前天|the day before yesterday|past
上周|last week|past
去年|last year|past
昨天晚上|last night|past
今天|today|present
每天|every day|present
现在|now|present
明天|tomorrow|future
后天|the day after tomorrow|future
下周|next week|future
明年|next year|future
"""

# zh suffix after the landmark noun | english preposition
POSITIONS = """
上|on
下面|under
里|in
旁边|next to
后面|behind
前面|in front of
"""

# zh | english | person | number — subjects and their object/possessive forms
PRONOUNS = """
我|I|me|my|1|sg
你|you|you|your|2|sg
他|he|him|his|3|sg
她|she|her|her|3|sg
我们|we|us|our|1|pl
你们|you|you|your|2|pl
他们|they|them|their|3|pl
她们|they|them|their|3|pl
"""

NUMERALS = """
一|1
两|2
三|3
四|4
五|5
六|6
七|7
八|8
九|9
十|10
十二|12
二十|20
"""

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten", 12: "twelve", 20: "twenty"}


def rows(block: str) -> list[list[str]]:
    """Split a table block into rows of fields: 'a|b\\nc|d' -> [['a','b'], ['c','d']]."""
    return [line.split("|") for line in block.strip().splitlines()]
