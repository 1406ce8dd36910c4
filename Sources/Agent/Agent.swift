import CloudInit
import Crypto
import Foundation
import Libvirt
import Logging
import NIOSSL
import PoolAPI
import ServiceLifecycle
import Support
import Synchronization

/// A failure that stops the agent: it cannot do anything useful until a
/// person fixes what the message says.
public struct AgentFatalError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A build step that failed, and why.
struct BuildError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The agent: checks in with the pool, applies its actions once each,
/// builds and boots instances through libvirt, reports every change, and
/// enforces leases, all as one Service. It shuts down on graceful shutdown
/// without touching running VMs; what it was doing resumes at its next
/// start from its SQLite state.
public final class Agent: Service, Sendable {
    public static let version = "corral-agent 0.1.0"

    let configuration: AgentConfiguration
    let logger: Logger
    let client: PoolClient
    let store: AgentStore
    let images: ImageCache
    let connection: Connection
    let virtType: VirtualizationType
    let paths: Paths

    /// Where instance files live under the state directory.
    /// Where an instance's files live. A name becomes a path only if it
    /// keeps the pool's name rule, and only if the path it makes lies
    /// inside its directory: a hostile name touches nothing.
    struct Paths: Sendable {
        var disks: String
        var consoles: String

        func disk(_ name: String) throws -> String { try inside(disks, name, ".qcow2") }
        func seed(_ name: String) throws -> String { try inside(disks, name, ".seed.iso") }
        func console(_ name: String) throws -> String { try inside(consoles, name, ".log") }

        private func inside(_ directory: String, _ name: String, _ suffix: String) throws -> String {
            if let problem = ResourceName.problem(name) {
                throw BuildError("the instance name \(String(reflecting: String(name.prefix(80)))) is refused: it \(problem)")
            }
            let root = URL(fileURLWithPath: directory).standardizedFileURL.path
            let path = URL(fileURLWithPath: "\(directory)/\(name)\(suffix)").standardizedFileURL.path
            guard path.hasPrefix(root + "/"), !path.dropFirst(root.count + 1).contains("/") else {
                throw BuildError("the path for instance \(name) leaves \(directory)")
            }
            return path
        }
    }

    struct Reported: Equatable {
        var state: InstanceState
        var error: String?
        var addresses: [IPAddress]
        var reason: String?
        var keysApplied: String?
        /// How many launch phases of the agent's own the report carried
        /// (the pool records the others itself, so they are no news).
        var phases = 0

        static func agentPhases(_ timeline: [TimelineEntry]) -> Int {
            timeline.count { !LaunchPhase.recordedByPool.contains($0.phase) }
        }
    }

    struct State {
        var applianceName: String?
        var builds: [String: Task<Void, Never>] = [:]
        var decommissions: [String: Task<Void, Never>] = [:]
        var watches: [String: Task<Void, Never>] = [:]
        var rekeys: [String: Task<Void, Never>] = [:]
        var reported: [String: Reported] = [:]
    }

    let state = Mutex(State())
    let locks = KeyedLocks()
    let buildSlots: Semaphore
    let outboxWakeup = Wakeup()
    let reconcileWakeup = Wakeup()
    /// QEMU's group: the files QEMU reads are 0640 to it.
    let qemuGroup: gid_t
    let metrics: AgentMetrics

    /// Opens the agent's store, image cache and libvirt connection, and
    /// settles the virtualization type.
    public static func open(configuration: AgentConfiguration, token: String, logger: Logger) async throws -> Agent {
        // Nothing from the pool is acted on unless signed by its pinned key.
        guard let keyText = configuration.signingKey, let keyBytes = ReplySignature.publicKeyBytes(keyText),
            let signingKey = try? Curve25519.Signing.PublicKey(rawRepresentation: keyBytes)
        else {
            throw AgentFatalError(
                "pool.signing_key is not set: run `corral agent register` again (it pins the pool's key), or set it to what `corral pool signing-key` prints on the pool")
        }
        let fileManager = FileManager.default
        let state = configuration.stateDirectory
        let paths = Paths(disks: "\(state)/disks", consoles: "\(state)/consoles")
        guard let qemuGroup = FileModes.groupID(configuration.qemuGroup) else {
            throw AgentFatalError(
                "libvirt.qemu_group '\(configuration.qemuGroup)' is not a group on this host; set it to the group in libvirt's qemu.conf")
        }
        for directory in [state, paths.disks, paths.consoles] {
            // Root's, and QEMU's group may pass through to the disks and seeds; nobody else.
            try fileManager.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try FileModes.set(directory, mode: 0o710, group: qemuGroup)
        }
        if case .user = configuration.network, configuration.isolateHost {
            try await GuestIsolation.apply(qemuUser: configuration.qemuUser, scratch: state)
            logger.info("guests are kept from the host's loopback (nftables table inet \(GuestIsolation.table))")
        }
        let store = try AgentStore(path: "\(state)/agent.sqlite")
        let metrics = AgentMetrics()
        let images = try ImageCache(
            directory: configuration.imageDirectory, store: store, limits: configuration.images, qemuUser: configuration.qemuUser,
            qemuGroup: qemuGroup, logger: logger, metrics: metrics)
        let connection: Connection
        do {
            connection = try await Connection.open(configuration.libvirtURI)
        } catch {
            await images.shutdown()
            let reason = (error as? LibvirtError)?.message ?? "\(error)"
            throw AgentFatalError("cannot connect to libvirt at \(configuration.libvirtURI): \(reason)")
        }
        let resolved = await connection.resolveVirtualization(
            configuration.virtualization, workDirectory: URL(fileURLWithPath: state))
        logger.info("virtualization: \(resolved.type) (\(resolved.reason))")
        var tls: TLSConfiguration?
        if let caFile = configuration.caFile {
            do {
                tls = try PoolClient.tlsConfiguration(trusting: caFile)
            } catch {
                await images.shutdown()
                await connection.close()
                throw AgentFatalError("pool.ca_file: \(error); run `corral agent register --pool-ca FILE` again with the pool's CA")
            }
        }
        let client = PoolClient(baseURL: configuration.poolURL, fallbackURLs: configuration.fallbackPoolURLs, token: token, version: version, signingKey: signingKey, tls: tls)
        return Agent(
            configuration: configuration, logger: logger, client: client, store: store, images: images,
            connection: connection, virtType: resolved.type, paths: paths, qemuGroup: qemuGroup, metrics: metrics)
    }

    init(
        configuration: AgentConfiguration, logger: Logger, client: PoolClient, store: AgentStore, images: ImageCache,
        connection: Connection, virtType: VirtualizationType, paths: Paths, qemuGroup: gid_t, metrics: AgentMetrics = AgentMetrics()
    ) {
        self.qemuGroup = qemuGroup
        self.metrics = metrics
        self.configuration = configuration
        self.logger = logger
        self.client = client
        self.store = store
        self.images = images
        self.connection = connection
        self.virtType = virtType
        self.paths = paths
        self.buildSlots = Semaphore(limit: configuration.maxConcurrentBuilds)
    }

    /// Releases the pool client, image cache and libvirt connection.
    public func close() async {
        await client.shutdown()
        await images.shutdown()
        await connection.close()
    }

    // MARK: Running

    public func run() async throws {
        try await recover()
        let events = try await connection.events()
        try await cancelWhenGracefulShutdown {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.checkInLoop() }
                group.addTask { await self.outboxLoop() }
                group.addTask { await self.reconcileLoop() }
                if let listen = self.configuration.metricsListen {
                    group.addTask {
                        try await self.metrics.serve(
                            host: listen.host, port: listen.port, store: self.store, connection: self.connection, logger: self.logger
                        ) { port in
                            let host = listen.host.contains(":") ? "[\(listen.host)]" : listen.host
                            self.logger.info("metrics listening on http://\(host):\(port)/metrics")
                        }
                    }
                }
                group.addTask {
                    for await event in events {
                        switch event {
                        case .domain(let event):
                            // Other domains on the host are none of the agent's business.
                            guard (try? await self.store.instance(named: event.name)) != nil else { continue }
                            self.logger.debug("libvirt: \(event)")
                            self.reconcileWakeup.signal()
                        case .disconnected(let reason):
                            self.logger.warning("libvirt connection lost (\(reason)); reconnecting")
                        case .reconnected:
                            self.logger.info("libvirt connection restored; reconciling every instance")
                            self.reconcileWakeup.signal()
                        }
                    }
                }
                // The first loop to end (with an error, or at cancellation) ends all.
                defer { group.cancelAll() }
                try await group.next()
            }
        }
        let tasks = state.withLock { Array($0.builds.values) + Array($0.decommissions.values) + Array($0.watches.values) }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
        logger.info("agent stopped; running VMs were left as they are")
    }

    /// Picks up what a previous run left: builds and decommissions resume,
    /// files no instance owns are removed.
    func recover() async throws {
        let instances = try await store.instances()
        let names = Set(instances.map(\.name))
        for instance in instances {
            switch instance.phase {
            case .building: startBuild(instance.name)
            case .deleting: startDecommission(instance.name)
            case .booting, .active: startWatch(instance.name)
            default: break
            }
            if instance.keysPending { startRekey(instance.name) }
        }
        let fileManager = FileManager.default
        for (directory, suffixes) in [(paths.disks, [".qcow2", ".seed.iso", ".seed.iso.part"]), (paths.consoles, [".log"])] {
            for file in (try? fileManager.contentsOfDirectory(atPath: directory)) ?? [] {
                // A rotated console log (NAME.log.N) belongs to NAME too.
                let unrotated = file.lastIndex(of: ".").map { index in
                    file[file.index(after: index)...].allSatisfy(\.isNumber) && file[..<index].hasSuffix(".log") ? String(file[..<index]) : file
                } ?? file
                let owner = suffixes.lazy.filter { unrotated.hasSuffix($0) }.map { String(unrotated.dropLast($0.count)) }.first
                guard owner.map({ !names.contains($0) }) ?? true else { continue }
                logger.notice("removing \(directory)/\(file): no instance owns it")
                try? fileManager.removeItem(atPath: "\(directory)/\(file)")
            }
        }
        for domain in (try? await connection.domains()) ?? [] {
            guard let metadata = try? await domain.instanceMetadata(), !names.contains(metadata.instance) else { continue }
            if metadata.pool == configuration.poolURL {
                logger.warning("domain \(domain.name) carries Corral metadata for instance \(metadata.instance), which this agent does not know; left alone",
                    metadata: ["instance": "\(metadata.instance)", "domain": "\(domain.name)"])
            }
        }
    }

    func metadata(for instance: LocalInstance) -> InstanceMetadata {
        InstanceMetadata(
            instance: instance.name, appliance: state.withLock { $0.applianceName } ?? "",
            pool: configuration.poolURL, leaseExpires: instance.expires)
    }

    func domain(of instance: LocalInstance) async throws -> Domain {
        guard let uuid = UUID(uuidString: instance.uuid) else { throw BuildError("instance \(instance.name) has no valid UUID") }
        return try await connection.domain(uuid: uuid)
    }
}
