import Egress
import Foundation
import Support

/// Everything the pool controller is configured with. `corral pool serve`
/// reads it from a TOML file (see `etc/corral/pool.toml`), then applies its
/// flags on top.
public struct PoolConfiguration: Sendable, Equatable {
    /// The address to listen on.
    public var host: String
    /// The port to listen on (0: any free port).
    public var port: Int
    /// The URL agents and users reach the pool at (served in `/openapi.yaml`).
    public var publicURL: String?
    /// PEM files of the certificate chain and private key to serve TLS
    /// with; both or neither (plain HTTP).
    public var tlsCertificate: String?
    public var tlsKey: String?
    /// Where the pool's database is: a SQLite file's path (the embedded
    /// default), or a `postgres://` URL (see ``PostgresLocation``).
    public var database: String
    /// How many connections the pool keeps to a PostgreSQL database, at most.
    public var databaseConnections: Int = 20
    /// How many console lines the pool keeps per instance.
    public var consoleTailLines: Int
    public var callbacks: CallbackLimits
    /// How long a reservation waits to be claimed.
    public var reservationSeconds: Int
    public var housekeeping: Housekeeping
    public var leases: Leases
    public var warmPools: WarmPools
    public var limits: Limits
    /// Seconds a connection may sit idle between requests before the
    /// server closes it (event streams and held check-ins are not idle).
    public var idleTimeoutSeconds: Int
    /// Connections served at once; more wait in the listen backlog.
    public var maxConnections: Int
    /// Whether `GET /metrics` needs a superuser's token (`[metrics]
    /// require_token`): appliance names and capacity are not for strangers.
    public var metricsRequireToken = true

    /// The bounds on what users and appliances may ask for and report.
    /// Each is checked where a request arrives; a request outside them is a
    /// 400 (or 429 for the per-appliance record cap) naming the field.
    public struct Limits: Sendable, Equatable {
        /// The longest lease or reservation anyone may ask for, and the
        /// furthest from now a lease may be extended to (1 year).
        public var maxLeaseSeconds: Int = 31_536_000
        /// The largest instance size (a flavor, or what an appliance
        /// reports of an instance).
        public var maxVCPUs: Int = 1024
        public var maxMemoryMiB: Int = 16 << 20
        public var maxDiskGiB: Int = 1 << 20
        /// The most instances one check-in may list, and the most instance
        /// records one appliance may hold in the pool.
        public var maxInstancesPerAppliance: Int = 1000
        /// The most check-ins of one appliance held open at once (429 beyond).
        public var maxHeldCheckInsPerAppliance: Int = 4
        /// The most event streams one token may hold open (429 beyond).
        public var maxEventStreamsPerToken: Int = 8
        /// The most server-instances one `GET /v1/server-instance` page
        /// holds, and the page size when `limit` is not given.
        public var maxPageSize: Int = 1000
        /// SSH keys a user may keep (`/v1/ssh-key`).
        public var maxSSHKeysPerUser: Int = 100
        public var defaultPageSize: Int = 100

        public init() {}
    }

    /// How long instances created through the user-facing API are leased.
    public struct Leases: Sendable, Equatable {
        /// For users without a lease of their own (`corral pool user add --lease-seconds`).
        public var defaultSeconds: Int = 7 * 86_400

        public init() {}
    }

    /// How the pool keeps templates' warm instances.
    public struct WarmPools: Sendable, Equatable {
        /// How often it retires, drops and replaces warm instances.
        public var intervalSeconds: Int = 15
        /// Warm instances older than this are retired (decommissioned).
        public var maxAgeSeconds: Int = 4 * 3600

        public init() {}
    }

    /// How the pool fetches callback URLs.
    public struct CallbackLimits: Sendable, Equatable {
        /// The deadline of each fetch.
        public var timeoutSeconds: Int = 5
        /// The largest reply accepted.
        public var maxBytes: Int = 64 * 1024
        /// The longest chain of callbacks followed.
        public var maxHops: Int = 7
        /// The ports callbacks may reach; empty: any.
        public var ports: [Int] = [80, 443]
        /// Networks (CIDR) callbacks may reach although they are loopback,
        /// private or link-local. Empty: only public addresses.
        public var allow: [String] = []

        public init() {}
    }

    /// When housekeeping runs and what it counts as old.
    public struct Housekeeping: Sendable, Equatable {
        public var intervalSeconds: Int = 60
        /// An appliance not seen for this long is stale: no new placements.
        public var applianceStaleSeconds: Int = 300
        /// An instance on offer with no report for this long is withdrawn.
        public var offerStaleSeconds: Int = 900
        /// Decommissioned and withdrawn instances are deleted after this.
        public var purgeAfterSeconds: Int = 86_400

        public init() {}
    }

    public init(
        host: String = "127.0.0.1", port: Int = 8080, publicURL: String? = nil,
        database: String = "/var/lib/corral/pool.sqlite", consoleTailLines: Int = 1000,
        callbacks: CallbackLimits = .init(), reservationSeconds: Int = 600, housekeeping: Housekeeping = .init(),
        leases: Leases = .init(), warmPools: WarmPools = .init(), limits: Limits = .init(), idleTimeoutSeconds: Int = 60,
        maxConnections: Int = 1024
    ) {
        self.host = host
        self.port = port
        self.publicURL = publicURL
        self.database = database
        self.consoleTailLines = consoleTailLines
        self.callbacks = callbacks
        self.reservationSeconds = reservationSeconds
        self.housekeeping = housekeeping
        self.leases = leases
        self.warmPools = warmPools
        self.limits = limits
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.maxConnections = maxConnections
    }

    /// Every key a pool configuration file may hold, by section.
    static let keys: [String: Set<String>] = [
        "server": ["host", "port", "public_url", "idle_timeout_seconds", "max_connections", "tls_certificate", "tls_key"],
        "database": ["path", "url", "max_connections"],
        "instances": ["console_tail_lines"],
        "callbacks": ["timeout_seconds", "max_bytes", "max_hops", "allow", "ports"],
        "reservations": ["expire_seconds"],
        "housekeeping": ["interval_seconds", "appliance_stale_seconds", "offer_stale_seconds", "purge_after_seconds"],
        "leases": ["default_seconds"],
        "warm_pools": ["interval_seconds", "max_age_seconds"],
        "metrics": ["require_token"],
        "limits": [
            "max_lease_seconds", "max_flavor_vcpus", "max_flavor_memory_mib", "max_flavor_disk_gib", "max_instances_per_appliance",
            "max_held_check_ins_per_appliance", "max_event_streams_per_token", "max_page_size", "default_page_size",
            "max_ssh_keys_per_user",
        ],
    ]

    /// Reads a configuration file; keys it leaves out keep their defaults.
    /// Unknown keys, wrong types and out-of-range values are errors naming
    /// the key.
    public static func load(path: String) throws -> PoolConfiguration {
        try invalidAsPoolError { try read(TOMLReader.load(path: path, known: keys, example: example, mainSection: "server")) }
    }

    /// Parses the text of a configuration file named `source` in errors.
    public static func parse(_ text: String, source: String = "configuration") throws -> PoolConfiguration {
        try invalidAsPoolError { try read(TOMLReader(text, source: source, known: keys, example: example, mainSection: "server")) }
    }

    private static let example = "etc/corral/pool.toml"

    private static func invalidAsPoolError<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as ConfigurationError {
            throw PoolError.invalid(field: error.field, reason: error.reason)
        }
    }

    private static func read(_ reader: TOMLReader) throws -> PoolConfiguration {
        var configuration = PoolConfiguration()
        configuration.host = try reader.string("server", "host") ?? configuration.host
        configuration.port = try reader.int("server", "port", in: 0...65535) ?? configuration.port
        configuration.publicURL = try reader.string("server", "public_url") ?? configuration.publicURL
        configuration.tlsCertificate = try reader.string("server", "tls_certificate")
        configuration.tlsKey = try reader.string("server", "tls_key")
        switch (configuration.tlsCertificate, configuration.tlsKey) {
        case (nil, nil), (_?, _?): break
        case (nil, _?): throw reader.invalid("server", "tls_certificate", "tls_key is set, so tls_certificate must name the certificate's PEM file too")
        case (_?, nil): throw reader.invalid("server", "tls_key", "tls_certificate is set, so tls_key must name the private key's PEM file too")
        }
        configuration.idleTimeoutSeconds =
            try reader.int("server", "idle_timeout_seconds", in: 1...3600) ?? configuration.idleTimeoutSeconds
        configuration.maxConnections = try reader.int("server", "max_connections", in: 1...1_000_000) ?? configuration.maxConnections
        switch (try reader.string("database", "path"), try reader.string("database", "url")) {
        case (let path?, nil): configuration.database = path
        case (nil, let url?):
            do {
                _ = try PostgresLocation(url: url)
            } catch PoolError.invalid(_, let reason) {
                throw reader.invalid("database", "url", reason)
            }
            configuration.database = url
        case (_?, _?): throw reader.invalid("database", "url", "give database.path (SQLite) or database.url (PostgreSQL), not both")
        case (nil, nil): break
        }
        configuration.databaseConnections =
            try reader.int("database", "max_connections", in: 1...1000) ?? configuration.databaseConnections
        configuration.consoleTailLines =
            try reader.int("instances", "console_tail_lines", in: 0...100_000) ?? configuration.consoleTailLines
        configuration.callbacks.timeoutSeconds =
            try reader.int("callbacks", "timeout_seconds", in: 1...60) ?? configuration.callbacks.timeoutSeconds
        configuration.callbacks.maxBytes =
            try reader.int("callbacks", "max_bytes", in: 1...(16 << 20)) ?? configuration.callbacks.maxBytes
        configuration.callbacks.maxHops = try reader.int("callbacks", "max_hops", in: 1...7) ?? configuration.callbacks.maxHops
        configuration.callbacks.allow = try reader.strings("callbacks", "allow") ?? configuration.callbacks.allow
        if let ports = try reader.ints("callbacks", "ports") {
            guard ports.allSatisfy({ (1...65535).contains($0) }) else {
                throw reader.invalid("callbacks", "ports", "ports must be from 1 to 65535")
            }
            configuration.callbacks.ports = ports
        }
        for network in configuration.callbacks.allow where IPNetwork(network) == nil {
            throw reader.invalid(
                "callbacks", "allow", "'\(network)' is not an address or network such as \"127.0.0.0/8\" or \"fd00::/8\"")
        }
        configuration.reservationSeconds =
            try reader.int("reservations", "expire_seconds", in: 1...604_800) ?? configuration.reservationSeconds
        var housekeeping = configuration.housekeeping
        housekeeping.intervalSeconds = try reader.int("housekeeping", "interval_seconds", in: 1...86_400) ?? housekeeping.intervalSeconds
        housekeeping.applianceStaleSeconds =
            try reader.int("housekeeping", "appliance_stale_seconds", in: 1...604_800) ?? housekeeping.applianceStaleSeconds
        housekeeping.offerStaleSeconds =
            try reader.int("housekeeping", "offer_stale_seconds", in: 1...604_800) ?? housekeeping.offerStaleSeconds
        housekeeping.purgeAfterSeconds =
            try reader.int("housekeeping", "purge_after_seconds", in: 1...31_536_000) ?? housekeeping.purgeAfterSeconds
        configuration.housekeeping = housekeeping
        configuration.leases.defaultSeconds =
            try reader.int("leases", "default_seconds", in: 60...31_536_000) ?? configuration.leases.defaultSeconds
        configuration.warmPools.intervalSeconds =
            try reader.int("warm_pools", "interval_seconds", in: 1...86_400) ?? configuration.warmPools.intervalSeconds
        configuration.warmPools.maxAgeSeconds =
            try reader.int("warm_pools", "max_age_seconds", in: 60...31_536_000) ?? configuration.warmPools.maxAgeSeconds
        configuration.metricsRequireToken = try reader.bool("metrics", "require_token") ?? configuration.metricsRequireToken
        var limits = configuration.limits
        limits.maxLeaseSeconds = try reader.int("limits", "max_lease_seconds", in: 60...(10 * 31_536_000)) ?? limits.maxLeaseSeconds
        limits.maxVCPUs = try reader.int("limits", "max_flavor_vcpus", in: 1...65_536) ?? limits.maxVCPUs
        limits.maxMemoryMiB = try reader.int("limits", "max_flavor_memory_mib", in: 1...(1 << 30)) ?? limits.maxMemoryMiB
        limits.maxDiskGiB = try reader.int("limits", "max_flavor_disk_gib", in: 1...(1 << 30)) ?? limits.maxDiskGiB
        limits.maxInstancesPerAppliance =
            try reader.int("limits", "max_instances_per_appliance", in: 1...100_000) ?? limits.maxInstancesPerAppliance
        limits.maxHeldCheckInsPerAppliance =
            try reader.int("limits", "max_held_check_ins_per_appliance", in: 1...1000) ?? limits.maxHeldCheckInsPerAppliance
        limits.maxEventStreamsPerToken =
            try reader.int("limits", "max_event_streams_per_token", in: 1...1000) ?? limits.maxEventStreamsPerToken
        limits.maxPageSize = try reader.int("limits", "max_page_size", in: 1...100_000) ?? limits.maxPageSize
        limits.defaultPageSize = try reader.int("limits", "default_page_size", in: 1...100_000) ?? limits.defaultPageSize
        limits.maxSSHKeysPerUser = try reader.int("limits", "max_ssh_keys_per_user", in: 1...10_000) ?? limits.maxSSHKeysPerUser
        guard limits.defaultPageSize <= limits.maxPageSize else {
            throw reader.invalid("limits", "default_page_size", "must be at most limits.max_page_size (\(limits.maxPageSize))")
        }
        configuration.limits = limits
        guard configuration.leases.defaultSeconds <= limits.maxLeaseSeconds else {
            throw reader.invalid("leases", "default_seconds", "must be at most limits.max_lease_seconds (\(limits.maxLeaseSeconds))")
        }
        return configuration
    }
}
