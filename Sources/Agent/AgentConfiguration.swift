import Egress
import Foundation
import Libvirt
import PoolAPI
import Support

/// Everything the agent is configured with, read from a TOML file (see
/// `etc/corral/agent.toml`). Keys the file leaves out keep the defaults
/// below.
public struct AgentConfiguration: Sendable, Equatable {
    /// The pool controller's base URL, e.g. `http://127.0.0.1:8080`.
    public var poolURL: String
    /// Other replicas of the same pool, tried in turn when the one in use
    /// cannot be reached.
    public var fallbackPoolURLs: [String] = []
    /// The file holding the appliance's API token (mode 0600).
    public var tokenFile: String
    /// The pool's public key (base64 Ed25519), pinned by `register`: every
    /// reply to a check-in or report must be signed by it.
    public var signingKey: String?
    /// Whether a pool reached over plain http on another host is accepted.
    public var insecure = false
    /// A PEM file of the CA (or self-signed certificate) an https pool's
    /// certificate must chain to; set by `register --pool-ca`. Nil: the
    /// system's trust store.
    public var caFile: String?
    public var libvirtURI: String
    public var virtualization: VirtualizationType
    /// Durable state (`agent.sqlite`), instance disks, seeds and consoles.
    public var stateDirectory: String
    /// The content-addressed image cache.
    public var imageDirectory: String
    public var network: Network
    /// Whether guests are on QEMU's user-mode network.
    var isUserNetwork: Bool {
        if case .user = network { return true }
        return false
    }

    /// The host users are told to reach SSH forwards at (`[network]
    /// public_address`); nil: 127.0.0.1, where QEMU's forwards listen.
    public var publicAddress: String?
    public var checkInSeconds: Int
    /// Each check-in waits `checkInSeconds` plus up to this much at random,
    /// so appliances started together do not call the pool in step.
    public var checkInJitterSeconds: Int
    public var maxConcurrentBuilds: Int
    /// A build whose guest has not come up by then is reported errored.
    public var bootTimeoutSeconds: Int
    /// How many console lines a report carries.
    public var consoleTailLines: Int
    /// How long an expired lease's VM stays suspended before it is
    /// decommissioned.
    public var leaseGraceSeconds: Int
    /// vCPUs offered per host CPU (memory and disk are never overcommitted).
    public var cpuOvercommit: Int
    /// Where and how images, kernels and initrds are downloaded.
    public var images = Images()
    /// Whether guests under user-mode networking are kept from the host's
    /// loopback services (see ``GuestIsolation``).
    public var isolateHost = true
    /// The user QEMU runs as (libvirt's qemu.conf `user`): the isolation
    /// rules match it, and `qemu-img` runs as it on untrusted images.
    public var qemuUser = "libvirt-qemu"
    /// QEMU's group (qemu.conf `group`): the agent's directories and the
    /// files QEMU reads belong to it, closed to everyone else.
    public var qemuGroup = "libvirt-qemu"
    /// Where the agent serves its Prometheus metrics (`[metrics] listen`,
    /// HOST:PORT; port 0 picks one and logs it); nil: not served.
    public var metricsListen: (host: String, port: Int)? {
        get { metricsHost.map { ($0, metricsPort) } }
        set {
            metricsHost = newValue?.host
            metricsPort = newValue?.port ?? 0
        }
    }
    var metricsHost: String?
    var metricsPort = 0

    /// The image downloads' guard and bounds (`[images]`).
    public struct Images: Sendable, Equatable {
        /// Networks image URLs may reach besides public addresses.
        public var allow: [String] = []
        /// Ports image URLs may use; empty means any.
        public var ports: [Int] = []
        /// The largest file downloaded (an image is also bounded by its
        /// flavor's disk).
        public var maxBytes: Int64 = 64 << 30
        /// The whole download, headers and body, must end within this.
        public var downloadTimeoutSeconds = 3600
        /// Whether an image, kernel or initrd without a sha256 is refused.
        public var requireSHA256 = true
        /// The image cache's size: after each download, the least recently
        /// used files no instance uses are removed until the cache fits.
        public var cacheMaxBytes: Int64 = 50 << 30

        public init() {}
    }

    /// How instances reach the network.
    public enum Network: Sendable, Equatable {
        /// QEMU's user-mode NAT: no set-up on the host, guests reach out but
        /// are not reachable (except through `ssh_forward_ports`).
        case user(sshForwardPorts: ClosedRange<Int>?)
        /// A libvirt network by name (addresses come from its DHCP leases).
        case network(String)
        /// A host bridge by name (addresses come from the ARP table).
        case bridge(String)
    }

    public init(
        poolURL: String = "http://127.0.0.1:8080", tokenFile: String = "/etc/corral/agent.token",
        libvirtURI: String = "qemu:///system", virtualization: VirtualizationType = .auto,
        stateDirectory: String = "/var/lib/corral/agent", imageDirectory: String = "/var/lib/corral/images",
        network: Network = .user(sshForwardPorts: nil), checkInSeconds: Int = 30, checkInJitterSeconds: Int = 5,
        maxConcurrentBuilds: Int = 2, bootTimeoutSeconds: Int = 300, consoleTailLines: Int = 100,
        leaseGraceSeconds: Int = 3600, cpuOvercommit: Int = 4
    ) {
        self.poolURL = poolURL
        self.tokenFile = tokenFile
        self.libvirtURI = libvirtURI
        self.virtualization = virtualization
        self.stateDirectory = stateDirectory
        self.imageDirectory = imageDirectory
        self.network = network
        self.checkInSeconds = checkInSeconds
        self.checkInJitterSeconds = checkInJitterSeconds
        self.maxConcurrentBuilds = maxConcurrentBuilds
        self.bootTimeoutSeconds = bootTimeoutSeconds
        self.consoleTailLines = consoleTailLines
        self.leaseGraceSeconds = leaseGraceSeconds
        self.cpuOvercommit = cpuOvercommit
    }

    static let keys: [String: Set<String>] = [
        "pool": ["url", "fallback_urls", "token_file", "signing_key", "insecure", "ca_file"],
        "libvirt": ["uri", "virt_type", "qemu_user", "qemu_group"],
        "paths": ["state_dir", "image_dir"],
        "network": ["mode", "name", "ssh_forward_ports", "isolate_host", "public_address"],
        "images": ["allow", "ports", "max_bytes", "download_timeout_seconds", "require_sha256", "cache_max_bytes"],
        "check_in": ["period_seconds", "jitter_seconds"],
        "builds": ["max_concurrent", "boot_timeout_seconds"],
        "console": ["tail_lines"],
        "leases": ["grace_seconds"],
        "capacity": ["cpu_overcommit"],
        "metrics": ["listen"],
    ]

    static let example = "etc/corral/agent.toml"

    /// Reads a configuration file. Unknown keys, wrong types and
    /// out-of-range values are a ``ConfigurationError`` naming the key.
    public static func load(path: String) throws -> AgentConfiguration {
        try read(TOMLReader.load(path: path, known: keys, example: example, mainSection: "pool"))
    }

    /// Parses the text of a configuration file named `source` in errors.
    public static func parse(_ text: String, source: String = "agent.toml") throws -> AgentConfiguration {
        try read(TOMLReader(text, source: source, known: keys, example: example, mainSection: "pool"))
    }

    private static func read(_ reader: TOMLReader) throws -> AgentConfiguration {
        var configuration = AgentConfiguration()
        if let url = try reader.string("pool", "url") {
            guard let components = URLComponents(string: url), ["http", "https"].contains(components.scheme),
                components.host?.isEmpty == false
            else {
                throw reader.invalid("pool", "url", "must be an http or https URL such as \"http://127.0.0.1:8080\" (it is \"\(url)\")")
            }
            configuration.poolURL = url
        }
        if let urls = try reader.strings("pool", "fallback_urls") {
            guard urls.count <= 16 else { throw reader.invalid("pool", "fallback_urls", "may list at most 16 URLs") }
            for url in urls {
                guard let components = URLComponents(string: url), ["http", "https"].contains(components.scheme),
                    components.host?.isEmpty == false
                else {
                    throw reader.invalid(
                        "pool", "fallback_urls", "each must be an http or https URL such as \"http://127.0.0.2:8080\" (one is \"\(url.prefix(200))\")")
                }
            }
            configuration.fallbackPoolURLs = urls
        }
        configuration.tokenFile = try reader.string("pool", "token_file") ?? configuration.tokenFile
        if let key = try reader.string("pool", "signing_key") {
            guard ReplySignature.publicKeyBytes(key) != nil else {
                throw reader.invalid("pool", "signing_key", "must be the pool's public key as `corral pool signing-key` prints it (base64 of 32 bytes)")
            }
            configuration.signingKey = key
        }
        configuration.insecure = try reader.bool("pool", "insecure") ?? configuration.insecure
        if let caFile = try reader.string("pool", "ca_file") {
            guard caFile.hasPrefix("/") else {
                throw reader.invalid("pool", "ca_file", "must be an absolute path to a PEM certificate (it is \"\(caFile)\")")
            }
            configuration.caFile = caFile
        }
        for (key, address) in [("url", configuration.poolURL)] + configuration.fallbackPoolURLs.map({ ("fallback_urls", $0) }) {
            if !configuration.insecure, let url = URLComponents(string: address), url.scheme == "http", !Self.isLoopback(url.host ?? "") {
                throw reader.invalid(
                    "pool", key,
                    "plain http to another host (\(url.host ?? "")) lets anyone on the path read the token; use https, or set pool.insecure = true")
            }
        }
        configuration.libvirtURI = try reader.string("libvirt", "uri") ?? configuration.libvirtURI
        if let type = try reader.choice("libvirt", "virt_type", of: VirtualizationType.allCases.map(\.rawValue)) {
            configuration.virtualization = VirtualizationType(rawValue: type)!
        }
        for (key, path) in [("state_dir", \AgentConfiguration.stateDirectory), ("image_dir", \.imageDirectory)] {
            guard let value = try reader.string("paths", key) else { continue }
            guard value.hasPrefix("/") else { throw reader.invalid("paths", key, "must be an absolute path (it is \"\(value)\")") }
            configuration[keyPath: path] = value
        }
        let mode = try reader.choice("network", "mode", of: ["user", "network", "bridge"]) ?? "user"
        let name = try reader.string("network", "name")
        let ports = try reader.string("network", "ssh_forward_ports")
        switch mode {
        case "user":
            guard name == nil else { throw reader.invalid("network", "name", "is only for mode \"network\" or \"bridge\"") }
            var range: ClosedRange<Int>?
            if let ports {
                guard let bounds = Self.portRange(ports) else {
                    throw reader.invalid(
                        "network", "ssh_forward_ports", "must be a port range such as \"22000-22999\" within 1024-65535 (it is \"\(ports)\")")
                }
                range = bounds
            }
            configuration.network = .user(sshForwardPorts: range)
        default:
            guard let name, !name.isEmpty else {
                throw reader.invalid("network", "name", "is required for mode \"\(mode)\": the libvirt \(mode == "network" ? "network" : "bridge")'s name")
            }
            guard ports == nil else { throw reader.invalid("network", "ssh_forward_ports", "is only for mode \"user\"") }
            configuration.network = mode == "network" ? .network(name) : .bridge(name)
        }
        configuration.isolateHost = try reader.bool("network", "isolate_host") ?? configuration.isolateHost
        if let address = try reader.string("network", "public_address") {
            guard !address.isEmpty, address.utf8.count <= 253,
                address.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || ".-:".contains($0)) })
            else {
                throw reader.invalid("network", "public_address", "must be an IP address or DNS name users reach this appliance at (it is \"\(address.prefix(80))\")")
            }
            configuration.publicAddress = address
        }
        for (key, path) in [("qemu_user", \AgentConfiguration.qemuUser), ("qemu_group", \.qemuGroup)] {
            guard let name = try reader.string("libvirt", key) else { continue }
            guard !name.isEmpty, name.utf8.count <= 32, name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != 0x22 && $0 != 0x5c }) else {
                throw reader.invalid("libvirt", key, "must be a name such as \"libvirt-qemu\"")
            }
            configuration[keyPath: path] = name
        }
        configuration.images.allow = try reader.strings("images", "allow") ?? []
        for network in configuration.images.allow where IPNetwork(network) == nil {
            throw reader.invalid("images", "allow", "'\(network)' is not an address or network such as \"127.0.0.0/8\" or \"fd00::/8\"")
        }
        configuration.images.ports = try reader.ints("images", "ports") ?? []
        for port in configuration.images.ports where !(1...65535).contains(port) {
            throw reader.invalid("images", "ports", "\(port) is not a port (1-65535)")
        }
        if let bytes = try reader.int("images", "max_bytes", in: 1...(1 << 50)) { configuration.images.maxBytes = Int64(bytes) }
        configuration.images.downloadTimeoutSeconds =
            try reader.int("images", "download_timeout_seconds", in: 1...86_400) ?? configuration.images.downloadTimeoutSeconds
        configuration.images.requireSHA256 = try reader.bool("images", "require_sha256") ?? configuration.images.requireSHA256
        if let bytes = try reader.int("images", "cache_max_bytes", in: 1...(1 << 50)) { configuration.images.cacheMaxBytes = Int64(bytes) }
        configuration.checkInSeconds = try reader.int("check_in", "period_seconds", in: 1...3600) ?? configuration.checkInSeconds
        configuration.checkInJitterSeconds =
            try reader.int("check_in", "jitter_seconds", in: 0...3600) ?? configuration.checkInJitterSeconds
        configuration.maxConcurrentBuilds = try reader.int("builds", "max_concurrent", in: 1...64) ?? configuration.maxConcurrentBuilds
        configuration.bootTimeoutSeconds =
            try reader.int("builds", "boot_timeout_seconds", in: 1...86_400) ?? configuration.bootTimeoutSeconds
        configuration.consoleTailLines = try reader.int("console", "tail_lines", in: 0...1000) ?? configuration.consoleTailLines
        configuration.leaseGraceSeconds = try reader.int("leases", "grace_seconds", in: 0...2_592_000) ?? configuration.leaseGraceSeconds
        configuration.cpuOvercommit = try reader.int("capacity", "cpu_overcommit", in: 1...64) ?? configuration.cpuOvercommit
        if let listen = try reader.string("metrics", "listen"), !listen.isEmpty {
            guard let address = Self.hostPort(listen) else {
                throw reader.invalid("metrics", "listen", "must be HOST:PORT such as \"127.0.0.1:9464\" or \"[::1]:9464\", port 0 to 65535 (it is \"\(listen.prefix(100))\")")
            }
            configuration.metricsListen = address
        }
        return configuration
    }

    /// The TOML text of this configuration, as `corral agent register` writes it.
    public func rendered() -> String {
        func quoted(_ value: String) -> String {
            var escaped = ""
            for scalar in value.unicodeScalars {
                switch scalar {
                case "\"": escaped += "\\\""
                case "\\": escaped += "\\\\"
                case _ where scalar.value < 0x20 || scalar.value == 0x7f:
                    escaped += String(format: "\\u%04X", scalar.value)
                default: escaped.unicodeScalars.append(scalar)
                }
            }
            return "\"\(escaped)\""
        }
        var network: String
        switch self.network {
        case .user(let ports):
            network = "mode = \"user\""
            if let ports { network += "\nssh_forward_ports = \"\(ports.lowerBound)-\(ports.upperBound)\"" }
        case .network(let name): network = "mode = \"network\"\nname = \(quoted(name))"
        case .bridge(let name): network = "mode = \"bridge\"\nname = \(quoted(name))"
        }
        network += "\nisolate_host = \(isolateHost)"
        if let publicAddress { network += "\npublic_address = \(quoted(publicAddress))" }
        return """
            # Corral agent configuration (see etc/corral/agent.toml for every key).
            [pool]
            url = \(quoted(poolURL))
            fallback_urls = [\(fallbackPoolURLs.map(quoted).joined(separator: ", "))]
            token_file = \(quoted(tokenFile))
            \(signingKey.map { "signing_key = \(quoted($0))" } ?? "# signing_key: run corral agent register")
            insecure = \(insecure)
            \(caFile.map { "ca_file = \(quoted($0))" } ?? "# ca_file: the system's trust store")

            [libvirt]
            uri = \(quoted(libvirtURI))
            virt_type = "\(virtualization.rawValue)"
            qemu_user = \(quoted(qemuUser))
            qemu_group = \(quoted(qemuGroup))

            [paths]
            state_dir = \(quoted(stateDirectory))
            image_dir = \(quoted(imageDirectory))

            [network]
            \(network)

            [images]
            allow = [\(images.allow.map(quoted).joined(separator: ", "))]
            ports = [\(images.ports.map(String.init).joined(separator: ", "))]
            max_bytes = \(images.maxBytes)
            download_timeout_seconds = \(images.downloadTimeoutSeconds)
            require_sha256 = \(images.requireSHA256)
            cache_max_bytes = \(images.cacheMaxBytes)

            [check_in]
            period_seconds = \(checkInSeconds)
            jitter_seconds = \(checkInJitterSeconds)

            [builds]
            max_concurrent = \(maxConcurrentBuilds)
            boot_timeout_seconds = \(bootTimeoutSeconds)

            [console]
            tail_lines = \(consoleTailLines)

            [leases]
            grace_seconds = \(leaseGraceSeconds)

            [capacity]
            cpu_overcommit = \(cpuOvercommit)

            [metrics]
            listen = \(quoted(metricsListen.map { $0.host.contains(":") ? "[\($0.host)]:\($0.port)" : "\($0.host):\($0.port)" } ?? ""))

            """
    }

    /// Reads the API token: the file must exist, hold one non-empty line,
    /// and be readable by its owner only.
    /// `HOST:PORT` (an IPv6 host in brackets) split, or nil.
    static func hostPort(_ text: String) -> (host: String, port: Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65_535).contains(port)
        else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, host.utf8.count <= 255, host.allSatisfy({ $0.isLetter || $0.isNumber || ".-:".contains($0) }) else { return nil }
        return (host, port)
    }

    /// Whether `host` names this machine's loopback.
    public static func isLoopback(_ host: String) -> Bool {
        let bare = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        if bare == "localhost" { return true }
        guard let address = IPAddressBytes(bare) else { return false }
        return IPNetwork("127.0.0.0/8")!.contains(address) || IPNetwork("::1/128")!.contains(address)
    }

    /// A port range `FIRST-LAST` within 1024-65535, or nil.
    public static func portRange(_ text: String) -> ClosedRange<Int>? {
        let bounds = text.split(separator: "-").compactMap { Int($0) }
        guard bounds.count == 2, 1024 <= bounds[0], bounds[0] <= bounds[1], bounds[1] <= 65535 else { return nil }
        return bounds[0]...bounds[1]
    }

    public func readToken() throws -> String {
        try readTokenFile(tokenFile, field: "pool.token_file", holder: "appliance")
    }
}
