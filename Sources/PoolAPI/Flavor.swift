/// A size of instance the pool sells. Its identity is its specs (vCPUs,
/// memory, disk, network), not its name.
public struct Flavor: Codable, Sendable, Equatable, Hashable {
    public var name: String
    public var description: String
    public var vcpus: Int
    /// Memory in MiB.
    public var memory: Int
    /// Disk in GiB.
    public var disk: Int
    /// Upload limit in Mbit/s (0: unlimited).
    public var networkUp: Int
    /// Download limit in Mbit/s (0: unlimited).
    public var networkDown: Int
    /// The pool's price per hour.
    public var rate: Int
    /// The appliance's asking price per hour.
    public var ask: Int
    /// How many warm instances of this flavor the pool keeps booted (0: none).
    public var hot: Int
    /// Whether the flavor is offered.
    public var active: Bool

    enum CodingKeys: String, CodingKey {
        case name, description, vcpus, memory, disk, rate, ask, hot, active
        case networkUp = "network_up"
        case networkDown = "network_down"
    }

    public init(
        name: String, description: String = "", vcpus: Int, memory: Int, disk: Int, networkUp: Int = 0,
        networkDown: Int = 0, rate: Int = 0, ask: Int = 0, hot: Int = 0, active: Bool = true
    ) {
        self.name = name
        self.description = description
        self.vcpus = vcpus
        self.memory = memory
        self.disk = disk
        self.networkUp = networkUp
        self.networkDown = networkDown
        self.rate = rate
        self.ask = ask
        self.hot = hot
        self.active = active
    }
}
